#!/usr/bin/env bash
# Create .venv and install kataru into it (idempotent). `scripts/setup.sh test` adds the test tools.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || python3 -m venv .venv
# torch pinned: 2.13.0 is the CPU wheel on these machines; an unpinned torch pulls a multi-GB CUDA build.
.venv/bin/python -m pip install -q --disable-pip-version-check torch==2.13.0
if [ "${1:-}" = "test" ]; then
  .venv/bin/python -m pip install -q --disable-pip-version-check -e ".[test,bench,train]"
else
  .venv/bin/python -m pip install -q --disable-pip-version-check -e .
fi
