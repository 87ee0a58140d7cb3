"""Train a Unigram tokenizer with byte fallback, saved as a Hugging Face tokenizer folder.

sentencepiece trains the model (the way llm-jp's tokenizer was made: Unigram, byte fallback, digits
split, no dummy prefix, no normalisation) and the `tokenizers` library holds the result as
tokenizer.json, so transformers' AutoTokenizer and kataru load the same file. Newlines are kept as a
piece of their own, because Japanese prose is paragraphs.
"""

from __future__ import annotations

import random
import tempfile
from pathlib import Path

from kataru.data.corpus import read_documents
from kataru.errors import KataruError
from kataru.files import write_atomic, write_json
from kataru.prompts import LLM_JP_TEMPLATE

SPECIALS = {"unk_token": "<unk>", "bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>"}


def _training_lines(paths: list[str], field: str, max_lines: int, seed: int) -> list[str]:
    lines = [line for doc in read_documents(paths, field) for line in doc.text.split("\n") if line.strip()]
    if not lines:
        raise KataruError(f"no text in {', '.join(paths)}; the dataset is empty")
    random.Random(seed).shuffle(lines)
    return lines[:max_lines]


def train_tokenizer(paths: list[str], out: Path, vocab_size: int = 8000, field: str = "text",
                    max_lines: int = 400_000, character_coverage: float = 0.9995, seed: int = 0,
                    chat_template: str | None = LLM_JP_TEMPLATE) -> Path:
    """Train on the documents in `paths` and write tokenizer.json + tokenizer_config.json to `out`."""
    import sentencepiece as spm

    lines = _training_lines(paths, field, max_lines, seed)
    with tempfile.TemporaryDirectory() as tmp:
        corpus = Path(tmp) / "corpus.txt"
        corpus.write_text("\n".join(lines) + "\n", encoding="utf-8")
        prefix = str(Path(tmp) / "sp")
        try:
            spm.SentencePieceTrainer.train(
                input=str(corpus), model_prefix=prefix, model_type="unigram", vocab_size=vocab_size,
                character_coverage=character_coverage, byte_fallback=True, split_digits=True,
                add_dummy_prefix=False, remove_extra_whitespaces=False, normalization_rule_name="identity",
                allow_whitespace_only_pieces=True, max_sentence_length=1 << 16, num_threads=2,
                unk_id=0, bos_id=1, eos_id=2, pad_id=3, user_defined_symbols=["\n"],
                input_sentence_size=max_lines, shuffle_input_sentence=False, minloglevel=2, hard_vocab_limit=False,
            )
        except RuntimeError as err:
            reason = str(err).splitlines()[0].split("] ")[-1]
            # sentencepiece names its own flags; kataru's are --vocab-size and --character-coverage
            reason = reason.replace("vocab_size", "--vocab-size").replace(
                "decrease character_coverage with --character_coverage option", "lower --character-coverage")
            raise KataruError(f"sentencepiece could not train a {vocab_size}-piece vocabulary: {reason}") from None
        processor = spm.SentencePieceProcessor(model_file=prefix + ".model")
        save_hf_tokenizer(processor, out, chat_template)
    return out


def save_hf_tokenizer(processor, out: Path, chat_template: str | None) -> None:  # type: ignore[no-untyped-def]
    """A sentencepiece Unigram model as tokenizer.json (same ids) plus tokenizer_config.json."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, processors

    vocab = [(processor.id_to_piece(i), processor.get_score(i)) for i in range(processor.get_piece_size())]
    tokenizer = Tokenizer(models.Unigram(vocab, unk_id=processor.unk_id(), byte_fallback=True))
    tokenizer.normalizer = normalizers.Replace(" ", "▁")
    tokenizer.decoder = decoders.Sequence([decoders.ByteFallback(), decoders.Fuse(), decoders.Replace("▁", " ")])
    tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIALS.values()])
    tokenizer.add_tokens([AddedToken("\n", special=False, normalized=False)])
    bos = SPECIALS["bos_token"]
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, processor.bos_id())])
    out.mkdir(parents=True, exist_ok=True)
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        **SPECIALS,
        "add_bos_token": True,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": 1 << 30,
    }
    if chat_template:
        config["chat_template"] = chat_template
    write_json(out / "tokenizer_config.json", config)
    write_json(out / "special_tokens_map.json", SPECIALS)
    write_atomic(out / "tokenizer.json", tokenizer.to_str(pretty=True))  # last: without it the folder is no tokenizer
