#!/usr/bin/env bash
# Speculative decoding against llama.cpp's, in one sitting: kataru-tiny-ja (a trained model, so that proposals
# are kept for real) on the grounded and open-ended workloads of `kataru bench speculate`, kataru and
# llama-server on the same token ids, then what that acceptance implies on the full llm-jp-3.1-1.8b shape for
# both (kataru's verification costs measured by kataru, llama.cpp's by llama-bench on the same weights).
#
# usage: bench/speculate_llamacpp.sh LLAMA_CPP_DIR [WORK_DIR]   (LLAMA_CPP_DIR: see bench/llamacpp.sh; build
#        llama-server and llama-bench too). Writes WORK_DIR/speculate.json, llama-bench.json and the tables.
set -euo pipefail
cd "$(dirname "$0")/.."
llama=${1:?usage: bench/speculate_llamacpp.sh LLAMA_CPP_DIR [WORK_DIR]}
work=$(bench/llamacpp_models.sh "$llama" "${2:-/tmp/kataru-llamacpp}")
tiny="$work/kataru-tiny-ja"
if [ ! -f "$work/kataru-tiny-ja.gguf" ]; then
  # llama.cpp reads sentencepiece models, not a Unigram tokenizer.json: write the same vocabulary and scores as
  # one (no dummy prefix, whitespace kept, byte fallback), and tell llama.cpp not to add a space prefix.
  rm -rf "$tiny" && cp -r kataru/models/kataru-tiny-ja "$tiny"
  .venv/bin/python - "$tiny" "$llama" <<'PY'
import json, runpy, sys
from sentencepiece import sentencepiece_model_pb2 as pb
folder, llama = sys.argv[1], sys.argv[2]
t = json.load(open(f"{folder}/tokenizer.json"))
m = pb.ModelProto()
m.trainer_spec.model_type = pb.TrainerSpec.UNIGRAM
m.trainer_spec.vocab_size = len(t["model"]["vocab"])
m.trainer_spec.byte_fallback = True
ids = {a["content"]: a["id"] for a in t["added_tokens"]}
spec = m.trainer_spec
spec.unk_id, spec.bos_id, spec.eos_id, spec.pad_id = ids["<unk>"], ids["<s>"], ids["</s>"], ids["<pad>"]
m.normalizer_spec.name, m.normalizer_spec.add_dummy_prefix = "identity", False
m.normalizer_spec.remove_extra_whitespaces, m.normalizer_spec.escape_whitespaces = False, True
special = {a["content"]: a["special"] for a in t["added_tokens"]}
kinds = pb.ModelProto.SentencePiece
for piece, score in t["model"]["vocab"]:
    p = m.pieces.add()
    p.piece, p.score = piece, score
    p.type = (kinds.UNKNOWN if piece == "<unk>" else kinds.CONTROL if special.get(piece) else kinds.USER_DEFINED
              if piece in special else kinds.BYTE if len(piece) == 6 and piece.startswith("<0x") else kinds.NORMAL)
open(f"{folder}/tokenizer.model", "wb").write(m.SerializeToString())
sys.path[:0] = [llama, f"{llama}/gguf-py"]
from conversion.llama import LlamaModel
set_vocab = LlamaModel.set_vocab
def no_space_prefix(self):
    set_vocab(self)
    self.gguf_writer.add_add_space_prefix(False)
LlamaModel.set_vocab = no_space_prefix
sys.argv = ["convert_hf_to_gguf.py", folder, "--outtype", "f32", "--outfile", f"{folder}.gguf"]
runpy.run_path(f"{llama}/convert_hf_to_gguf.py", run_name="__main__")
PY
fi
.venv/bin/kataru bench speculate --limit 8 --new-tokens 128 --cost-of llm-jp-3.1-1.8b \
  --llama-server "$llama/build/bin/llama-server" --gguf "$work/kataru-tiny-ja.gguf" --json > "$work/speculate.json"
"$llama/build/bin/llama-bench" -m "$work/bf16.gguf" -t 2 -p 1,2,3,4,6,8,12,16 -n 32 -r 2 -o json \
  > "$work/llama-bench.json" 2>/dev/null
.venv/bin/python -c "import json, sys; from kataru.bench_speculate import format_table; \
print(format_table(json.load(open(sys.argv[1]))))" "$work/speculate.json"
.venv/bin/python bench/speculate_implied.py "$work/speculate.json" "$work/llama-bench.json" --plot "$work/speculate-implied.png"
