#!/usr/bin/env bash
# The checks that need a CUDA GPU, in one run: the tests that skip without one (CUDA graphs, torch's
# packed int8/int4 kernels, `kataru bench speed --device cuda` on a tiny shape), then the llm-jp-3.1-1.8b bench
# on the GPU. Uses a python that already has torch with CUDA and kataru's other dependencies (the lent
# device machine's own python3 has them); logs and the bench JSON go to $OUT (default ./gpu-check).
#
# usage: bench/gpu_check.sh [PYTHON]
set -uo pipefail
cd "$(dirname "$0")/.."
py=${1:-python3}
out=${OUT:-gpu-check}
mkdir -p "$out"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
"$py" -c "import torch; assert torch.cuda.is_available(), 'torch sees no CUDA GPU'; \
print('torch', torch.__version__, torch.cuda.get_device_name())" || exit 1
"$py" -m pytest -q -p no:cacheprovider -rs tests/test_engine.py tests/test_quantize.py tests/test_bench.py \
    tests/test_errors.py 2>&1 | tee "$out/pytest.log"
tests=${PIPESTATUS[0]}
"$py" -m kataru bench speed llm-jp-3.1-1.8b --device cuda --compare transformers --quantize int8,int4 \
    --json > "$out/bench.json" 2> "$out/bench.log"
bench=$?
"$py" -c "import json, sys; from kataru.bench import format_table; \
print(format_table(json.load(open(sys.argv[1]))))" "$out/bench.json" | tee "$out/bench.txt"
exit $((tests || bench))
