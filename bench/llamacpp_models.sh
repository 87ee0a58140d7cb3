#!/usr/bin/env bash
# The llm-jp-3.1-1.8b shape with random weights, as kataru and llama.cpp each run it: a Hugging Face folder
# (bf16, the llm-jp sentencepiece tokenizer) in WORK_DIR/hf, and GGUF files of the very same weights
# (WORK_DIR/bf16.gguf, Q8_0.gguf, Q4_0.gguf). Made once; bench/llamacpp.sh and bench/llamacpp_serve.sh use them.
#
# usage: bench/llamacpp_models.sh LLAMA_CPP_DIR [WORK_DIR]   (LLAMA_CPP_DIR: see bench/llamacpp.sh)
# Needs the llm-jp tokenizer from the data folder ($KATARU_DATA, default ../shared/data) and the test
# dependencies (transformers) in .venv.
set -euo pipefail
cd "$(dirname "$0")/.."
llama=${1:?usage: bench/llamacpp_models.sh LLAMA_CPP_DIR [WORK_DIR]}
work=${2:-/tmp/kataru-llamacpp}
tokenizer=${KATARU_DATA:-../shared/data}/tokenizers/llm-jp-v3.1/llm-jp-tokenizer-100k.ver3.1.model
[ -x "$llama/build/bin/llama-quantize" ] || { echo "no $llama/build/bin/llama-quantize: build llama.cpp first (see bench/llamacpp.sh)" >&2; exit 1; }
[ -f "$tokenizer" ] || { echo "no $tokenizer: the data folder is not here (set KATARU_DATA)" >&2; exit 1; }
mkdir -p "$work"
if [ ! -f "$work/hf/config.json" ]; then
  .venv/bin/python - "$work/hf" "$tokenizer" <<'PY'
import shutil, sys
import torch, transformers
from kataru.shapes import SHAPES
config = {k: v for k, v in SHAPES["llm-jp-3.1-1.8b"].items() if k != "model_type"}
torch.manual_seed(0)
model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**config, bos_token_id=1, eos_token_id=2))
model.to(torch.bfloat16).save_pretrained(sys.argv[1])
shutil.copy(sys.argv[2], f"{sys.argv[1]}/tokenizer.model")
PY
fi
if [ ! -f "$work/bf16.gguf" ]; then
  PYTHONPATH="$llama/gguf-py" .venv/bin/python "$llama/convert_hf_to_gguf.py" "$work/hf" --outtype bf16 \
    --outfile "$work/bf16.gguf" > "$work/convert.log" 2>&1
fi
for kind in Q8_0 Q4_0; do
  [ -f "$work/$kind.gguf" ] || "$llama/build/bin/llama-quantize" "$work/bf16.gguf" "$work/$kind.gguf" "$kind" 2 \
    > "$work/quantize-$kind.log" 2>&1
done
echo "$work"
