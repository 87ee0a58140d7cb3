#!/usr/bin/env bash
# `kataru serve` against llama.cpp's llama-server on the same weights, in one sitting: the llm-jp-3.1-1.8b
# shape with random weights, kataru int4 against Q4_0 (or bf16 against bf16), 8 and 32 concurrent streams of
# 128-token prompts and 128-token answers, llama-server with as many slots as streams (continuous batching).
#
# usage: bench/llamacpp_serve.sh LLAMA_CPP_DIR [int4|bf16] [kataru bench serve options]
set -euo pipefail
cd "$(dirname "$0")/.."
llama=${1:?usage: bench/llamacpp_serve.sh LLAMA_CPP_DIR [int4|bf16] [options]}
kind=${2:-int4}
shift $(( $# >= 2 ? 2 : 1 ))
work=$(bench/llamacpp_models.sh "$llama" "${WORK_DIR:-/tmp/kataru-llamacpp}")
case "$kind" in
  int4) quantize=(--quantize int4); gguf="$work/Q4_0.gguf" ;;
  bf16) quantize=(); gguf="$work/bf16.gguf" ;;
  *) echo "kind must be int4 or bf16" >&2; exit 2 ;;
esac
.venv/bin/kataru bench serve --start "$work/hf" "${quantize[@]}" --dtype bfloat16 --llama-server \
  "$llama/build/bin/llama-server" --gguf "$gguf" --concurrency 8,32 --prompt-tokens 128 --output-tokens 128 "$@"
