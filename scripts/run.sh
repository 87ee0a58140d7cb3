#!/usr/bin/env bash
# Set up a fresh machine and run kataru:
#   scripts/run.sh                                   # the embedded kataru-tiny-ja, "日本の首都はどこですか"
#   scripts/run.sh "自然言語処理とは何か"             # the embedded model, your prompt
#   scripts/run.sh ./llm-jp-3.1-1.8b-instruct4 "自然言語処理とは何か" [kataru generate options]
set -euo pipefail
cd "$(dirname "$0")/.."
model=()
# The first argument names a model folder when it is one, when a prompt follows it, or when it looks like a path:
# then it must exist, checked before anything runs.
if [ $# -ge 1 ] && { [ -d "$1" ] || { [ $# -ge 2 ] && [[ "$2" != -* ]]; } || [[ "$1" == /* || "$1" == ./* || "$1" == ../* ]]; }; then
  [ -d "$1" ] || { echo "kataru: error: model folder $1 does not exist; give the path of a local checkpoint folder" >&2
                   exit 2; }
  model=("$1"); shift
fi
scripts/setup.sh
prompt=${1:-日本の首都はどこですか}; shift || true
.venv/bin/kataru info "${model[@]}"
exec .venv/bin/kataru generate "${model[@]}" "$prompt" "$@"
