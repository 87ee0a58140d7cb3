#!/usr/bin/env bash
# The long reliability runs whose figures docs/reliability.md gives (the default test suite runs short ones).
#
#   scripts/soak.sh serve [MINUTES] [MODEL]   kataru serve MODEL (default: the embedded kataru-tiny-ja) under the
#                                             soak's load for MINUTES (default 30): docs/soak.json and docs/soak.png
#   scripts/soak.sh fuzz [EXAMPLES]           schemathesis over every route, EXAMPLES cases per route and mode
#                                             (default 500): docs/fuzz.json
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh test
case "${1:-}" in
  serve)
    minutes=${2:-30}
    model=(); [ -n "${3:-}" ] && model=("$3")
    port=$(.venv/bin/python -c "from kataru.serve.loadgen import free_port; print(free_port())")
    log=$(mktemp)
    .venv/bin/kataru serve "${model[@]}" --port "$port" --max-num-seqs 16 --kv-idle-seconds 5 >"$log" 2>&1 &
    server=$!
    trap 'kill $server 2>/dev/null || true; wait $server 2>/dev/null || true; rm -f "$log"' EXIT
    .venv/bin/python -c "from kataru.serve.loadgen import wait_ready; wait_ready('http://127.0.0.1:$port')"
    status=0
    .venv/bin/python -m kataru.serve.soak --url "http://127.0.0.1:$port" --pid "$server" --minutes "$minutes" \
      --idle-seconds 5 --out docs/soak.json --plot docs/soak.png || status=$?
    if grep -q "Traceback" "$log"; then echo "the server's log holds a traceback:" >&2; cat "$log" >&2; status=1; fi
    exit $status ;;
  fuzz)
    KATARU_FUZZ_EXAMPLES=${2:-500} KATARU_FUZZ_REPORT=docs/fuzz.json .venv/bin/python -m pytest -q \
      -p no:cacheprovider tests/test_fuzz.py ;;
  *) echo "usage: scripts/soak.sh serve [MINUTES] [MODEL] | fuzz [EXAMPLES]" >&2; exit 2 ;;
esac
