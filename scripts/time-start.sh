#!/usr/bin/env bash
# Process start to first token of `kataru generate` with the embedded model, next to `import torch` alone
# (the floor any Python tool that runs torch pays). Prints the median of N runs (default 5) of each.
set -euo pipefail
cd "$(dirname "$0")/.."
n=${1:-5}
median() { sort -n | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }
wall() { python3 -c "import subprocess, sys, time; t = time.perf_counter(); subprocess.run(sys.argv[1:], capture_output=True, check=True); print(f\"{time.perf_counter() - t:.2f}\")" "$@"; }
gen=$(for _ in $(seq "$n"); do wall .venv/bin/kataru generate "日本の首都はどこですか" --max-new-tokens 1; done | median)
imp=$(for _ in $(seq "$n"); do wall .venv/bin/python -c "import torch"; done | median)
echo "kataru generate, start to first token (median of $n): ${gen} s"
echo "python -c 'import torch' (median of $n):            ${imp} s"
