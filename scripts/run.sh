#!/usr/bin/env bash
# Set up a fresh machine and run kataru on a local checkpoint folder:
#   scripts/run.sh ./llm-jp-3.1-1.8b-instruct4 "自然言語処理とは何か"
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
if [ $# -lt 1 ]; then
  echo "usage: scripts/run.sh MODEL_FOLDER [PROMPT] [kataru generate options]" >&2
  exit 2
fi
model=$1; shift
prompt=${1:-自然言語処理とは何か}; shift || true
.venv/bin/kataru info "$model"
exec .venv/bin/kataru generate "$model" "$prompt" "$@"
