#!/usr/bin/env bash
# Set up a fresh machine and run kataru:
#   scripts/run.sh                                   # the embedded kataru-tiny-ja, "日本の首都はどこですか"
#   scripts/run.sh "自然言語処理とは何か"             # the embedded model, your prompt
#   scripts/run.sh ./llm-jp-3.1-1.8b-instruct4 "自然言語処理とは何か" [kataru generate options]
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
model=()
if [ $# -ge 1 ] && [ -d "$1" ]; then
  model=("$1"); shift
fi
prompt=${1:-日本の首都はどこですか}; shift || true
.venv/bin/kataru info "${model[@]}"
exec .venv/bin/kataru generate "${model[@]}" "$prompt" "$@"
