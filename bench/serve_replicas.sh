#!/usr/bin/env bash
# One `kataru serve` against `kataru serve --replicas N` (Ray Serve) on the same load, taking turns:
# `kataru bench serve` with 8 streams, 128 requests of 64 + 128 tokens, on the embedded model unless a folder
# is given. Prints one line per run: output tok/s, p50 TTFT and time between tokens.
# usage: bench/serve_replicas.sh [FOLDER] [--replicas 1] [--replica-cpus 1]
set -euo pipefail
cd "$(dirname "$0")/.."
folder=""; [ $# -gt 0 ] && [ "${1#--}" = "$1" ] && { folder=$1; shift; }
replica_args=("$@"); [ ${#replica_args[@]} -eq 0 ] && replica_args=(--replicas 1 --replica-cpus 1)
port=8191
run() {
  .venv/bin/kataru bench serve --url "http://127.0.0.1:$port" --concurrency 8 --requests 128 --prompt-tokens 64 \
    --output-tokens 128 --json 2>/dev/null | .venv/bin/python -c "
import json, sys
r = json.load(sys.stdin)['runs'][0]
print(f\"$1: {r['output_tok_s']:.1f} output tok/s, TTFT p50 {1000 * r['ttft_p50_s']:.0f} ms, \"
      f\"between tokens p50 {1000 * r['itl_p50_s']:.1f} ms, {r['failed']} failed\")"
}
wait_health() { for _ in $(seq 1 150); do sleep 2; curl -sf "localhost:$port/health" >/dev/null && return; done; exit 1; }
for round in 1 2; do
  .venv/bin/kataru serve $folder --port $port >/dev/null 2>&1 & pid=$!
  wait_health; run "single server"; kill -TERM $pid; wait $pid || true
  .venv/bin/kataru serve $folder --port $port "${replica_args[@]}" >/dev/null 2>&1 & pid=$!
  wait_health; sleep 3; run "Ray Serve ${replica_args[*]}"; kill -TERM $pid; wait $pid || true
done
