"""Token ids identical to the reference tokenizers, for real tokenizer files and trained ones.

transformers 5 ignores use_fast and converts every sentencepiece model to a `tokenizers` pipeline, which
changes the ids of models trained without a dummy prefix (nerdstash, rinna). The slow semantics the cards
were written for live on in transformers' `SentencePieceBackend`; that is the reference for the
sentencepiece checkpoints, and `AutoTokenizer` is the reference for tokenizer.json checkpoints.
"""

from __future__ import annotations

import gzip
import json
import shutil
from pathlib import Path

import pytest
from helpers import SHARED, train_sentencepiece, unigram_tokenizer_json, write_json

from kataru.tokenizer import StreamDecoder, Tokenizer

TOKENIZERS = SHARED / "tokenizers"
needs_shared = pytest.mark.skipif(not TOKENIZERS.is_dir(), reason=f"real tokenizer files not found at {TOKENIZERS}")

CORPUS = [
    "吾輩は猫である。名前はまだ無い。",
    "自然言語処理とは何か",
    "ｶﾀｶﾅ ＡＢＣ１２３ 半角と全角",
    "Hello  world",
    "  leading spaces",
    "trailing spaces  ",
    "tab\there\nnewline\n\nend",
    "😀👍🏽 絵文字と🇯🇵の旗",
    "12345 678.9 3.14159",
    "ユーザー: こんにちは<NL>システム: ",
    "<s>special</s> tokens in text",
    "x  ▁▁y ▁ under",
    "𠮷野家で牛丼を食べた。",
    "「かぎかっこ」と『二重』、…三点リーダー",
    "mixed 日本語 and English テキスト",
    " ",
    "",
]


def corpus() -> list[str]:
    lines = list(CORPUS)
    aozora = SHARED / "aozora" / "aozora-sample.jsonl.gz"
    if aozora.is_file():  # a few hundred real lines of Japanese prose
        with gzip.open(aozora, "rt", encoding="utf-8") as f:
            text = json.loads(f.readline())["text"]
        lines += [line for line in text.splitlines() if line.strip()][:300]
    return lines


def slow_reference(model_file: Path, **special: object):  # type: ignore[no-untyped-def]
    from transformers.tokenization_utils_sentencepiece import SentencePieceBackend

    return SentencePieceBackend(vocab_file=str(model_file), **special)


def check_encode(ours: Tokenizer, ref, lines: list[str], special: bool = False) -> None:  # type: ignore[no-untyped-def]
    for line in lines:
        expected = ref.encode(line, add_special_tokens=special)
        assert ours.encode(line, add_special_tokens=special) == expected, repr(line)


def sp_folder(tmp_path: Path, model: Path, name: str, config: dict) -> Path:
    shutil.copy(model, tmp_path / name)
    write_json(tmp_path / "tokenizer_config.json", config)
    return tmp_path


# --- sentencepiece checkpoints (slow semantics) --------------------------------------------------------

@needs_shared
def test_mistral_sentencepiece_matches_slow_reference(tmp_path: Path) -> None:
    model = TOKENIZERS / "mistral-v1" / "tokenizer.model"
    special = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}
    folder = sp_folder(tmp_path, model, "tokenizer.model",
                       {"tokenizer_class": "LlamaTokenizer", "add_bos_token": True, **special})
    ours, ref = Tokenizer(folder), slow_reference(model, **special)
    check_encode(ours, ref, corpus())
    assert ours.encode("猫", add_special_tokens=True)[0] == 1  # bos as the config says
    for line in corpus():
        if "<s>" not in line and "▁" not in line:  # lossless: decode gives the text back
            assert ours.decode(ours.encode(line)) == line


@needs_shared
def test_nerdstash_with_added_double_space_matches_slow_reference(tmp_path: Path) -> None:
    model = TOKENIZERS / "nerdstash-v1" / "novelai.model"
    special = {"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|unknown|>",
               "pad_token": "<|pad|>"}
    folder = sp_folder(tmp_path, model, "novelai.model",
                       {"tokenizer_class": "LlamaTokenizer", "add_bos_token": False, **special,
                        "additional_special_tokens": ["▁▁"]})
    ours = Tokenizer(folder)
    ref = slow_reference(model, **special, additional_special_tokens=["▁▁"])
    check_encode(ours, ref, corpus())
    double = ours.token_to_id("▁▁")
    assert double == ref.convert_tokens_to_ids("▁▁") == 14  # a piece of the vocabulary, now never split
    assert double in ours.encode("a ▁▁b") and double in ours.special_ids
    for line in corpus():
        if "▁" not in line and "  " not in line:  # the card decodes with skip_special_tokens, dropping ▁▁
            assert ours.decode(ours.encode(line)) == line


@needs_shared
@pytest.mark.parametrize("version", ["llm-jp-v3.1/llm-jp-tokenizer-100k.ver3.1.model",
                                     "llm-jp-v3.0b1/llm-jp-tokenizer-100k.ver3.0b1.model"])
def test_llm_jp_sentencepiece_matches_slow_reference(version: str, tmp_path: Path) -> None:
    model = TOKENIZERS / version
    special = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}
    folder = sp_folder(tmp_path, model, "tokenizer.model", {"add_bos_token": True, **special})
    check_encode(Tokenizer(folder), slow_reference(model, **special), corpus())


def test_rinna_options_match_slow_reference(tmp_path: Path) -> None:
    """A model trained here with rinna's options: no dummy prefix, whitespace kept, byte fallback, <NL>."""
    model = train_sentencepiece(tmp_path / "spiece.model", "unigram", 700, add_dummy_prefix=False,
                                remove_extra_whitespaces=False, user_defined_symbols=["<NL>"],
                                normalization_rule_name="identity")
    special = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}
    folder = tmp_path / "rinna"
    folder.mkdir()
    sp_folder(folder, model, "spiece.model", {"tokenizer_class": "T5Tokenizer", **special})
    ours = Tokenizer(folder)
    check_encode(ours, slow_reference(model, **special), corpus())
    assert len(ours.encode("a  b")) > len(ours.encode("a b"))  # whitespace is kept, not collapsed
    assert ours.id_to_token(ours.encode("abc")[0]) != "▁"  # and no dummy prefix
    assert ours.encode("x", add_special_tokens=True)[-1] == ours.eos_id  # T5Tokenizer appends </s>
    nl = ours.token_to_id("<NL>")
    assert nl is not None and nl in ours.encode("一行目<NL>二行目")
    for line in corpus():
        if "<s>" not in line and "▁" not in line:
            assert ours.decode(ours.encode(line)) == line


# --- tokenizer.json checkpoints ------------------------------------------------------------------------

@needs_shared
def test_gpt_neox_bpe_matches_auto_tokenizer(tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    shutil.copy(TOKENIZERS / "gpt-neox-20b" / "tokenizer.json", tmp_path / "tokenizer.json")
    write_json(tmp_path / "tokenizer_config.json", {
        "tokenizer_class": "GPTNeoXTokenizer", "bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>",
        "unk_token": "<|endoftext|>", "add_bos_token": False, "add_eos_token": False})
    ours, ref = Tokenizer(tmp_path), AutoTokenizer.from_pretrained(tmp_path)
    lines = [*corpus(), "<|endoftext|>inside", "   many    spaces   "]
    check_encode(ours, ref, lines)
    check_encode(ours, ref, lines, special=True)
    for line in lines:
        ids = ref.encode(line, add_special_tokens=False)
        assert ours.decode(ids) == ref.decode(ids, skip_special_tokens=True)
        assert ours.decode(ids, skip_special_tokens=False) == ref.decode(ids, skip_special_tokens=False)


@needs_shared
def test_llm_jp_tokenizer_json_matches_auto_tokenizer(tmp_path: Path) -> None:
    """llm-jp ships tokenizer.json (Unigram, byte fallback) with the config and special tokens in shared/."""
    from transformers import AutoTokenizer

    source = TOKENIZERS / "llm-jp-v3.1"
    unigram_tokenizer_json(source / "llm-jp-tokenizer-100k.ver3.1.model", tmp_path / "tokenizer.json")
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(source / name, tmp_path / name)
    ours, ref = Tokenizer(tmp_path), AutoTokenizer.from_pretrained(tmp_path)
    lines = [*corpus(), "<PAD|LLM-jp>と<MASK|LLM-jp>"]
    check_encode(ours, ref, lines)
    check_encode(ours, ref, lines, special=True)
    assert ours.pad_id == ref.pad_token_id and ours.eos_id == ref.eos_token_id
    for line in lines:
        ids = ref.encode(line, add_special_tokens=True)
        assert ours.decode(ids) == ref.decode(ids, skip_special_tokens=True)
    # The real upload's tokenizer.json carries a post-processor that adds <s>: that decides, not the config.
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers.processors import TemplateProcessing

    fast = HFTokenizer.from_file(str(tmp_path / "tokenizer.json"))
    fast.post_processor = TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 1)])
    fast.save(str(tmp_path / "tokenizer.json"))
    ours, ref = Tokenizer(tmp_path), AutoTokenizer.from_pretrained(tmp_path)
    check_encode(ours, ref, lines, special=True)
    assert ours.encode("猫", add_special_tokens=True)[0] == ours.bos_id == 1


@needs_shared
def test_mistral_converted_tokenizer_json_matches_auto_tokenizer(tmp_path: Path) -> None:
    """Gamma 7B ships a tokenizer.json converted by transformers; kataru reads it with `tokenizers`."""
    from transformers import AutoTokenizer

    (tmp_path / "src").mkdir()
    src = sp_folder(tmp_path / "src", TOKENIZERS / "mistral-v1" / "tokenizer.model", "tokenizer.model",
                    {"tokenizer_class": "LlamaTokenizer", "add_bos_token": True, "bos_token": "<s>",
                     "eos_token": "</s>", "unk_token": "<unk>"})
    AutoTokenizer.from_pretrained(src).save_pretrained(tmp_path / "fast")
    (tmp_path / "fast" / "tokenizer.model").unlink(missing_ok=True)
    ours, ref = Tokenizer(tmp_path / "fast"), AutoTokenizer.from_pretrained(tmp_path / "fast")
    check_encode(ours, ref, corpus())
    check_encode(ours, ref, corpus(), special=True)


# --- streaming -------------------------------------------------------------------------------------------

@needs_shared
def test_stream_decoder_never_emits_broken_characters(tmp_path: Path) -> None:
    model = TOKENIZERS / "mistral-v1" / "tokenizer.model"  # byte fallback for most kanji
    folder = sp_folder(tmp_path, model, "tokenizer.model", {"bos_token": "<s>", "eos_token": "</s>",
                                                            "unk_token": "<unk>"})
    tok = Tokenizer(folder)
    for text in ["吾輩は猫である。名前はまだ無い。 Hello world", "😀👍🏽 𠮷野家", "ｶﾀｶﾅ\n改行"]:
        ids = tok.encode(text)
        assert any(tok.id_to_token(i).startswith("<0x") for i in ids)
        decoder = StreamDecoder(tok)
        pieces = [decoder.push(i) for i in ids]
        assert all("\ufffd" not in p for p in pieces)
        assert "".join(pieces) == tok.decode(ids) == text


@pytest.mark.parametrize("family", ["llama", "gpt_neox", "mistral", "japanese_stablelm_alpha"])
def test_ids_past_the_tokenizer_decode_to_nothing(family: str, tokenizer_dirs: dict) -> None:
    """Models often pad their vocabulary past the tokenizer's pieces (llm-jp-3.1: 99,584 rows for 98,452
    pieces); sampling may pick such an id, which has no text and no bytes, and must not break decoding."""
    tok = Tokenizer(tokenizer_dirs[family][0])
    ids = tok.encode("吾輩は猫である")
    past = tok.vocab_size + 5
    assert tok.decode([*ids[:2], past, *ids[2:]]) == tok.decode(ids)
    assert tok.bytes_of(past) == b"" and tok.bytes_of(ids[0]) == tok.token_bytes()[ids[0]]
    stream = StreamDecoder(tok)
    assert "".join(stream.push(i) for i in [*ids[:2], past, *ids[2:]]) + stream.flush() == tok.decode(ids)
