#!/usr/bin/env bash
# llama.cpp on the llm-jp-3.1-1.8b shape with random weights (bf16, Q8_0, Q4_0), 2 threads, the peer that
# kataru is compared with; kataru's own figures come from `kataru bench`, on the same shape.
#
# usage: bench/llamacpp.sh LLAMA_CPP_DIR [WORK_DIR]
#   LLAMA_CPP_DIR  a llama.cpp source tree built with cmake (build/bin/llama-bench and llama-quantize), e.g.
#                  the one vendored in the llama-cpp-python sdist from PyPI:
#                    pip download --no-deps --no-binary :all: llama-cpp-python==0.3.36 && tar xzf llama_cpp_python-*.tar.gz
#                    cd llama_cpp_python-0.3.36/vendor/llama.cpp && cmake -B build -DCMAKE_BUILD_TYPE=Release \
#                      -DLLAMA_CURL=OFF && cmake --build build -j2 --target llama-bench llama-quantize
#   WORK_DIR       where the 7 GB of model files go (default /tmp/kataru-llamacpp)
# Needs the llm-jp tokenizer from ../shared/data (the GGUF converter reads a vocabulary) and the test
# dependencies (transformers) in .venv.
set -euo pipefail
cd "$(dirname "$0")/.."
llama=${1:?usage: bench/llamacpp.sh LLAMA_CPP_DIR [WORK_DIR]}
work=${2:-/tmp/kataru-llamacpp}
tokenizer=../shared/data/tokenizers/llm-jp-v3.1/llm-jp-tokenizer-100k.ver3.1.model
[ -x "$llama/build/bin/llama-bench" ] || { echo "no $llama/build/bin/llama-bench: build llama.cpp first (see the header)" >&2; exit 1; }
[ -f "$tokenizer" ] || { echo "no $tokenizer: the shared data is not here" >&2; exit 1; }
mkdir -p "$work"
if [ ! -f "$work/bf16.gguf" ]; then
  .venv/bin/python - "$work/hf" "$tokenizer" <<'EOF'
import shutil, sys
import torch, transformers
from kataru.shapes import SHAPES
config = {k: v for k, v in SHAPES["llm-jp-3.1-1.8b"].items() if k != "model_type"}
torch.manual_seed(0)
model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**config, bos_token_id=1, eos_token_id=2))
model.to(torch.bfloat16).save_pretrained(sys.argv[1])
shutil.copy(sys.argv[2], f"{sys.argv[1]}/tokenizer.model")
EOF
  PYTHONPATH="$llama/gguf-py" .venv/bin/python "$llama/convert_hf_to_gguf.py" "$work/hf" --outtype bf16 \
    --outfile "$work/bf16.gguf" > "$work/convert.log" 2>&1
  rm -rf "$work/hf"
fi
for kind in Q8_0 Q4_0; do
  [ -f "$work/$kind.gguf" ] || "$llama/build/bin/llama-quantize" "$work/bf16.gguf" "$work/$kind.gguf" "$kind" 2 \
    > "$work/quantize-$kind.log" 2>&1
done
"$llama/build/bin/llama-bench" -m "$work/bf16.gguf,$work/Q8_0.gguf,$work/Q4_0.gguf" -t 2 -p 512 -n 64 -r 3 2>/dev/null
