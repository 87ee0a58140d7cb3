#!/usr/bin/env bash
# Set up a fresh machine and run the checks CI runs: ruff, then the default pytest suite (slow tests excluded).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh test
.venv/bin/ruff check kataru tests bench recipes
.venv/bin/python -m pytest -q "$@"
