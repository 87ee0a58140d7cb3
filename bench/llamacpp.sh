#!/usr/bin/env bash
# llama.cpp on the llm-jp-3.1-1.8b shape with random weights (bf16, Q8_0, Q4_0), 2 threads, the peer that
# kataru is compared with; kataru's own figures come from `kataru bench`, on the same shape.
#
# usage: bench/llamacpp.sh LLAMA_CPP_DIR [WORK_DIR]
#   LLAMA_CPP_DIR  a llama.cpp source tree built with cmake (build/bin/llama-bench, llama-quantize and, for
#                  bench/llamacpp_serve.sh, llama-server), e.g. the one vendored in the llama-cpp-python sdist:
#                    pip download --no-deps --no-binary :all: llama-cpp-python==0.3.36 && tar xzf llama_cpp_python-*.tar.gz
#                    cd llama_cpp_python-0.3.36/vendor/llama.cpp && cmake -B build -DCMAKE_BUILD_TYPE=Release \
#                      -DLLAMA_CURL=OFF && cmake --build build -j2 --target llama-bench llama-quantize llama-server
#   WORK_DIR       where the model files go (default /tmp/kataru-llamacpp; bench/llamacpp_models.sh makes them)
set -euo pipefail
cd "$(dirname "$0")/.."
llama=${1:?usage: bench/llamacpp.sh LLAMA_CPP_DIR [WORK_DIR]}
work=$(bench/llamacpp_models.sh "$llama" "${2:-/tmp/kataru-llamacpp}")
"$llama/build/bin/llama-bench" -m "$work/bf16.gguf,$work/Q8_0.gguf,$work/Q4_0.gguf" -t 2 -p 512 -n 64 -r 3 2>/dev/null
