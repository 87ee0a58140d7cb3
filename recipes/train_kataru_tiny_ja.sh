#!/usr/bin/env bash
# Reproduce kataru-tiny-ja, the model shipped in kataru/models/, from ../shared/data on a CPU machine:
# clean Aozora -> tokenizer -> packed tokens -> pretrain -> SFT (JGLUE/Aozora-derived) -> DPO pairs
# by rejection sampling -> DPO -> evaluation -> copy into the package. Each stage is skipped when its
# output exists, so a stopped run continues where it ended (pretraining resumes from its checkpoint).
# Usage: recipes/train_kataru_tiny_ja.sh [RUN_FOLDER]   (default: runs/kataru-tiny-ja); KATARU_DATA names the
# data folder (default: ../shared/data)
set -euo pipefail
cd "$(dirname "$0")/.."
SHARED=${KATARU_DATA:-../shared/data}
RUN=${1:-runs/kataru-tiny-ja}
K=(.venv/bin/kataru)
[ -d "$SHARED/aozora" ] || { echo "needs $SHARED (Aozora and JGLUE files)" >&2; exit 2; }
[ -x .venv/bin/kataru ] || scripts/setup.sh test
mkdir -p "$RUN"
stage() { echo "== $1 ($(date +%H:%M:%S))" >&2; }

[ -f "$RUN/clean/train.jsonl" ] || { stage clean; "${K[@]}" data clean "$SHARED"/aozora/aozora-sample*.jsonl.gz \
  --out "$RUN/clean" --val-fraction 0.02; }
[ -f "$RUN/tokenizer/tokenizer.json" ] || { stage tokenizer; "${K[@]}" train-tokenizer "$RUN/clean/train.jsonl" \
  --out "$RUN/tokenizer" --vocab-size 8000 --max-lines 300000; }
[ -f "$RUN/tokens/meta.json" ] || { stage tokenize; "${K[@]}" data tokenize "$RUN/clean" \
  --tokenizer "$RUN/tokenizer" --out "$RUN/tokens" --workers 2; }
if [ ! -f "$RUN/pretrain/final/model.safetensors" ]; then
  stage pretrain
  resume=(); [ -f "$RUN/pretrain/checkpoints/latest" ] && resume=(--resume)
  "${K[@]}" pretrain --data "$RUN/tokens" --tokenizer "$RUN/tokenizer" --out "$RUN/pretrain" \
    --dim 256 --layers 6 --heads 4 --intermediate 704 --seq-len 256 --context 1024 --batch-size 16 \
    --max-steps 1400 --lr 2e-3 --warmup-steps 100 --eval-every 100 --save-every 100 --compile "${resume[@]}"
fi
[ -f "$RUN/sft.jsonl" ] || { stage derive-sft; "${K[@]}" data sft --jglue "$SHARED/jglue" \
  --aozora "$RUN/clean/train.jsonl" --out "$RUN/sft.jsonl"; }
if [ ! -f "$RUN/sft/final/model.safetensors" ]; then
  stage sft
  resume=(); [ -f "$RUN/sft/checkpoints/latest" ] && resume=(--resume)
  "${K[@]}" sft "$RUN/pretrain/final" --data "$RUN/sft.jsonl" --out "$RUN/sft" --seq-len 256 --batch-size 16 \
    --max-steps 400 --lr 1e-3 --warmup-steps 30 --eval-every 100 --save-every 100 "${resume[@]}"
fi
[ -f "$RUN/pairs.jsonl" ] || { stage dpo-pairs; "${K[@]}" data dpo "$RUN/sft/final" --sft-data "$RUN/sft.jsonl" \
  --out "$RUN/pairs.jsonl" --samples 4 --max-prompts 400; }
if [ ! -f "$RUN/dpo/final/model.safetensors" ]; then
  stage dpo
  resume=(); [ -f "$RUN/dpo/checkpoints/latest" ] && resume=(--resume)
  "${K[@]}" dpo "$RUN/sft/final" --data "$RUN/pairs.jsonl" --out "$RUN/dpo" --beta 0.1 --seq-len 256 \
    --batch-size 8 --max-steps 100 --lr 5e-5 --warmup-steps 10 --eval-every 25 --save-every 25 "${resume[@]}"
fi
stage evaluate
for m in pretrain sft dpo; do
  "${K[@]}" eval jcommonsenseqa "$RUN/$m/final" --data "$SHARED/jglue/jcommonsenseqa-v1.3/valid-v1.3.json" \
    --json > "$RUN/jcqa-$m.json"
  "${K[@]}" eval perplexity "$RUN/$m/final" --dtype float32 --json > "$RUN/quality-$m.json"
done
stage ship
KATARU_DATA=$SHARED .venv/bin/python recipes/ship_model.py "$RUN" kataru/models/kataru-tiny-ja
