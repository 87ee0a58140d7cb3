#!/usr/bin/env bash
# Process start to first token of `kataru generate` with the embedded model (the first byte it streams to
# stdout) and to its exit, next to the same without the console script's gc.freeze() and to `import torch`
# alone (the floor any Python tool that runs torch pays).
# The runs take turns; prints the medians of N runs (default 5) of each.
set -euo pipefail
cd "$(dirname "$0")/.."
.venv/bin/python - "${1:-5}" <<'EOF'
import statistics
import subprocess
import sys
import time

runs = int(sys.argv[1])
generate = ["generate", "日本の首都はどこですか", "--max-new-tokens", "8"]
commands = {
    "kataru generate": [".venv/bin/kataru", *generate],
    "the same, main() without gc.freeze()": [".venv/bin/python", "-c", "import sys; from kataru.cli import main; "
                                             f"sys.exit(main({generate!r}))"],
    "python -c 'import torch; print()'": [".venv/bin/python", "-c", "import torch; print(flush=True)"],
}


def timed(command: list[str]) -> tuple[float, float]:
    """(seconds to the first byte on stdout, seconds to exit)."""
    start = time.perf_counter()
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    assert process.stdout is not None
    process.stdout.read(1)
    first = time.perf_counter() - start
    process.communicate()
    if process.returncode:
        raise SystemExit(f"{' '.join(command)} exited with {process.returncode}")
    return first, time.perf_counter() - start


times: dict[str, list[tuple[float, float]]] = {name: [] for name in commands}
for _ in range(runs):
    for name, command in commands.items():
        times[name].append(timed(command))
print(f"medians of {runs} runs, taking turns")
for name, pairs in times.items():
    first = statistics.median(p[0] for p in pairs)
    done = statistics.median(p[1] for p in pairs)
    print(f"{name:38s} first output {first:.2f} s, exit {done:.2f} s")
EOF
