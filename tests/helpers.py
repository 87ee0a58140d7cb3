"""What the tests share: tiny random-weight checkpoints of every seed family built with transformers (the
reference) or tests/alpha_reference.py, small tokenizers trained here, and the no-cache generation loop
every engine result is compared with."""

from __future__ import annotations

import io
import json
import os
import shutil
from pathlib import Path

import torch

from kataru.sampling import SamplingParams, pick_token, sampling_generator, seen_tokens

# The real data sets (tokenizers, JGLUE, Aozora Bunko): $KATARU_DATA, else this repository's ../shared/data.
SHARED = Path(os.environ.get("KATARU_DATA") or Path(__file__).resolve().parents[2] / "shared" / "data")

CORPUS = [
    "吾輩は猫である。名前はまだ無い。",
    "どこで生れたかとんと見当がつかぬ。何でも薄暗いじめじめした所でニャーニャー泣いていた事だけは記憶している。",
    "自然言語処理とは、人間の言葉をコンピュータで扱う技術です。",
    "渋谷の観光地を教えてください。",
    "与えられたことわざの意味を小学生でも分かるように教えてください。",
    "情けは人のためならず",
    "日本の首都は東京です。富士山は日本で一番高い山です。",
    "Hello world, this is a small English sentence.",
    "The quick brown fox jumps over the lazy dog 12345.",
    "ユーザー: こんにちは<NL>システム: こんにちは、何かお手伝いできますか？",
    "今日は良い天気ですね。明日は雨が降るでしょう。",
    "東京タワーとスカイツリーはどちらが高いですか？",
]


def corpus_lines(repeat: int = 40) -> list[str]:
    return [line for _ in range(repeat) for line in CORPUS]


def train_sentencepiece(path: Path, model_type: str = "unigram", vocab_size: int = 400, **options: object) -> Path:
    import sentencepiece as spm

    buffer = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus_lines()), model_writer=buffer, vocab_size=vocab_size, model_type=model_type,
        byte_fallback=True, character_coverage=1.0, hard_vocab_limit=False, minloglevel=2, **options,
    )
    path.write_bytes(buffer.getvalue())
    return path


def sp_size(path: Path) -> int:
    import sentencepiece as spm

    return spm.SentencePieceProcessor(model_file=str(path)).get_piece_size()


def unigram_tokenizer_json(sp_model: Path, out: Path) -> None:
    """A tokenizer.json converted from a sentencepiece Unigram model, as llm-jp's HF upload is."""
    import sentencepiece as spm
    from tokenizers import AddedToken, Tokenizer, decoders, normalizers
    from tokenizers.models import Unigram

    sp = spm.SentencePieceProcessor(model_file=str(sp_model))
    vocab = [(sp.id_to_piece(i), sp.get_score(i)) for i in range(sp.get_piece_size())]
    tok = Tokenizer(Unigram(vocab, unk_id=sp.unk_id(), byte_fallback=True))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    controls = [sp.id_to_piece(i) for i in range(sp.get_piece_size()) if sp.is_control(i) or sp.is_unknown(i)]
    tok.add_special_tokens([AddedToken(p, special=True, normalized=False) for p in controls])
    tok.save(str(out))


def bpe_tokenizer_json(out: Path, vocab_size: int = 400) -> None:
    """A small byte-level BPE like GPT-NeoX's."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=True)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>", "<|padding|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(corpus_lines(), trainer=trainer)
    tok.add_special_tokens([AddedToken("<|endoftext|>", special=True)])
    tok.save(str(out))


def write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, ensure_ascii=False, indent=1), encoding="utf-8")


LLM_JP_CHAT_TEMPLATE = (
    "{{bos_token}}{% for message in messages %}{% if message['role'] == 'user' %}"
    "{{ '\\n\\n### 指示:\\n' + message['content'] }}{% elif message['role'] == 'system' %}"
    "{{ message['content'] }}{% elif message['role'] == 'assistant' %}"
    "{{ '\\n\\n### 応答:\\n' + message['content'] + eos_token }}{% endif %}"
    "{% if loop.last and add_generation_prompt %}{{ '\\n\\n### 応答:\\n' }}{% endif %}{% endfor %}"
)

TINY = {"hidden_size": 64, "intermediate_size": 160, "num_hidden_layers": 2, "num_attention_heads": 4,
        "max_position_embeddings": 256}


def build_tokenizer(family: str, folder: Path) -> int:
    """Write the family's tokenizer files into folder; return the vocabulary size."""
    if family == "llama":
        sp = train_sentencepiece(folder / "sp.model.tmp", "unigram", 700)
        unigram_tokenizer_json(sp, folder / "tokenizer.json")
        size = sp_size(sp)
        sp.unlink()
        write_json(folder / "tokenizer_config.json", {
            "tokenizer_class": "PreTrainedTokenizerFast", "add_bos_token": True, "add_eos_token": False,
            "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "chat_template": LLM_JP_CHAT_TEMPLATE,
            "clean_up_tokenization_spaces": False})
        return size
    if family == "gpt_neox":  # rinna: sentencepiece without dummy prefix, whitespace kept, <NL> a piece
        sp = train_sentencepiece(folder / "spiece.model", "unigram", 700, add_dummy_prefix=False,
                                 remove_extra_whitespaces=False, user_defined_symbols=["<NL>"],
                                 pad_id=3, pad_piece="[PAD]")
        write_json(folder / "tokenizer_config.json", {
            "tokenizer_class": "T5Tokenizer", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
            "pad_token": "[PAD]", "extra_ids": 0, "additional_special_tokens": [], "do_lower_case": False})
        return sp_size(sp)
    if family == "stablelm":
        bpe_tokenizer_json(folder / "tokenizer.json")
        write_json(folder / "tokenizer_config.json", {
            "tokenizer_class": "GPTNeoXTokenizer", "bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>",
            "unk_token": "<|endoftext|>", "add_bos_token": False, "add_eos_token": False})
        from tokenizers import Tokenizer

        return Tokenizer.from_file(str(folder / "tokenizer.json")).get_vocab_size()
    if family == "mistral":
        sp = train_sentencepiece(folder / "tokenizer.model", "bpe", 700)
        write_json(folder / "tokenizer_config.json", {
            "tokenizer_class": "LlamaTokenizer", "add_bos_token": True, "add_eos_token": False,
            "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "legacy": True})
        return sp_size(sp)
    if family == "japanese_stablelm_alpha":  # nerdstash-like: no dummy prefix, digits split, plus ▁▁
        sp = train_sentencepiece(folder / "tokenizer.model", "bpe", 700, add_dummy_prefix=False, split_digits=True,
                                 unk_id=1, bos_id=2, eos_id=3, pad_id=0, unk_piece="<|unknown|>",
                                 bos_piece="<|startoftext|>", eos_piece="<|endoftext|>", pad_piece="<|pad|>")
        write_json(folder / "tokenizer_config.json", {
            "tokenizer_class": "LlamaTokenizer", "add_bos_token": False, "add_eos_token": False,
            "bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|unknown|>",
            "pad_token": "<|pad|>", "additional_special_tokens": ["▁▁"]})
        return sp_size(sp) + 1
    raise ValueError(family)


def hf_model(family: str, vocab_size: int, **overrides: object) -> torch.nn.Module:
    import transformers as T

    torch.manual_seed(0)
    common = {**TINY, "vocab_size": vocab_size, **overrides}
    if family == "llama":
        config = T.LlamaConfig(**common, rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2)
        model = T.LlamaForCausalLM(config)
    elif family == "mistral":
        config = T.MistralConfig(**{"num_key_value_heads": 2, "sliding_window": 24, **common},
                                 rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2)
        model = T.MistralForCausalLM(config)
    elif family == "stablelm":
        config = T.StableLmConfig(**{"num_key_value_heads": 4, "partial_rotary_factor": 0.25, **common},
                                  bos_token_id=0, eos_token_id=0)
        model = T.StableLmForCausalLM(config)
    elif family == "gpt_neox":
        config = T.GPTNeoXConfig(**{"rotary_pct": 1.0, "use_parallel_residual": False, **common},
                                 bos_token_id=1, eos_token_id=2)
        model = T.GPTNeoXForCausalLM(config)
    elif family == "japanese_stablelm_alpha":
        from alpha_reference import AlphaConfig, AlphaForCausalLM

        fields = {k: v for k, v in common.items() if k != "intermediate_size"}
        model = AlphaForCausalLM(AlphaConfig(**fields))
    else:
        raise ValueError(family)
    # Random init is tiny (std 0.02); larger weights make the logits differ enough to test something.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() >= 1 and "norm" not in name:
                p.normal_(0, 0.15)
            elif "norm" in name:
                p.uniform_(0.5, 1.5) if name.endswith("weight") else p.normal_(0, 0.1)
    return model.eval()


def save_model(model: torch.nn.Module, folder: Path, layout: str = "safetensors") -> None:
    """Save as transformers does: safetensors, a sharded index, or pytorch_model.bin."""
    from safetensors.torch import save_file

    if hasattr(model, "save_pretrained"):
        if layout == "sharded":
            model.save_pretrained(folder, max_shard_size="100KB")
        else:
            model.save_pretrained(folder)
        if layout == "bin":
            state = {k: v.contiguous() for k, v in model.state_dict().items()}
            for f in folder.glob("*.safetensors"):
                f.unlink()
            torch.save(state, folder / "pytorch_model.bin")
        return
    write_json(folder / "config.json", model.config.to_json())
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    if layout == "bin":
        torch.save(state, folder / "pytorch_model.bin")
    elif layout == "sharded":
        names = sorted(state)
        halves = [names[: len(names) // 2], names[len(names) // 2:]]
        weight_map = {}
        for i, part in enumerate(halves, 1):
            shard = f"model-{i:05d}-of-00002.safetensors"
            save_file({k: state[k] for k in part}, str(folder / shard), metadata={"format": "pt"})
            weight_map.update(dict.fromkeys(part, shard))
        write_json(folder / "model.safetensors.index.json", {"metadata": {}, "weight_map": weight_map})
    else:
        save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})


FAMILIES = ["llama", "gpt_neox", "stablelm", "mistral", "japanese_stablelm_alpha"]


def make_checkpoint(family: str, tokenizer_dirs: dict[str, tuple[Path, int]], folder: Path,
                    layout: str = "safetensors", **overrides: object) -> torch.nn.Module:
    tok_dir, vocab = tokenizer_dirs[family]
    folder.mkdir(parents=True, exist_ok=True)
    for f in tok_dir.iterdir():
        shutil.copy(f, folder / f.name)
    model = hf_model(family, vocab, **overrides)
    save_model(model, folder, layout)
    return model




@torch.inference_mode()
def generate_alone(model: torch.nn.Module, prompt: list[int], params: SamplingParams,
                   eos_ids: set[int] | frozenset[int] = frozenset()) -> list[int]:
    """nanoGPT's loop: every step runs the whole sequence again, no cache, and picks the next token with the
    engine's sampling rules; stops at eos (unless ignore_eos), max_new_tokens or the end of the context."""
    device = model.tok_embeddings.weight.device
    vocab, context = model.config.vocab_size, model.config.max_seq_len
    seen, generator = seen_tokens(prompt, vocab, device), sampling_generator(params, device)
    ids: list[int] = list(prompt)
    out: list[int] = []
    while len(out) < min(params.max_new_tokens, context - len(prompt)):
        token = pick_token(model(torch.tensor([ids], device=device), last_only=True)[0, -1], seen, params,
                           generator)
        seen[token] = True
        out.append(token)
        ids.append(token)
        if token in eos_ids and not params.ignore_eos:
            break
    return out


def jcqa_task(llm, rows: int, folder: Path, name: str) -> Path | None:  # type: ignore[no-untyped-def]
    """A local lm-evaluation-harness task over the first `rows` JCommonsenseQA validation questions, each
    prompt as `llm` formats it (what `kataru eval jcommonsenseqa` scores): the task folder, with the
    questions in `folder/questions.jsonl`; None without the JGLUE data."""
    from kataru.data.jglue import CHOICE_KEYS, question_text, read_questions

    valid = SHARED / "jglue" / "jcommonsenseqa-v1.3" / "valid-v1.3.json"
    if not valid.is_file():
        return None
    data = folder / "questions.jsonl"
    data.write_text("".join(json.dumps({**row, "prompt": llm.prompt_text(question_text(row)),
                                        "choices": [row[k] for k in CHOICE_KEYS]}, ensure_ascii=False) + "\n"
                            for row in read_questions(valid)[:rows]), encoding="utf-8")
    tasks = folder / "tasks"
    tasks.mkdir()
    (tasks / f"{name}.yaml").write_text(f"""task: {name}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{prompt}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{label}}}}"
target_delimiter: ""
metric_list:
  - metric: acc
""", encoding="utf-8")
    return tasks
