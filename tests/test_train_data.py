"""Data preparation and tokenizer training: Aozora cleaning, dedup, split, packed tokens, HF tokenizer."""

from __future__ import annotations

import gzip
import json
import random
import re
from pathlib import Path

import numpy as np
import pytest
from helpers import SHARED
from train_fixtures import aozora_work, write_corpus

from kataru.cli import main
from kataru.data.corpus import clean_aozora, clean_corpus, is_validation, load_tokens, read_documents
from kataru.errors import KataruError
from kataru.tokenizer import Tokenizer


def test_clean_aozora_drops_notation_legend_and_colophon() -> None:
    raw, expected = aozora_work(5, random.Random(1))
    assert "《" in raw and "｜" in raw and "［＃" in raw and "底本" in raw
    assert clean_aozora(raw) == expected


def test_clean_aozora_resolves_gaiji_to_the_character() -> None:
    text = "小心な※［＃「亞＋鳥」、第4水準2-94-23］《からす》が飛んだ。"
    assert clean_aozora(text) == "小心な鵶が飛んだ。"


@pytest.mark.skipif(not (SHARED / "aozora").is_dir(), reason="../shared/data/aozora is absent (a fresh clone)")
def test_clean_real_aozora_work() -> None:
    with gzip.open(SHARED / "aozora" / "aozora-sample.jsonl.gz", "rt") as f:
        f.readline()
        text = json.loads(f.readline())["text"]
    clean = clean_aozora(text)
    assert clean.startswith("あいびき\nイワン・ツルゲーネフ")
    for mark in ("《", "》", "［＃", "｜", "底本", "青空文庫", "-----"):
        assert mark not in clean
    assert "仏蘭西で死去した" in clean  # ruby reading removed, base text kept


def test_clean_corpus_dedups_and_splits_by_document(tmp_path: Path) -> None:
    raw = tmp_path / "raw.jsonl"
    cleaned = write_corpus(raw, works=60)
    lines = raw.read_text(encoding="utf-8").splitlines()
    # The same work again under another id (an edition without ruby) must be dropped as a duplicate.
    dup = json.loads(lines[3])
    dup["path"], dup["text"] = "cards/dup.txt", re.sub(r"《[^》]*》|｜", "", dup["text"])
    raw.write_text("\n".join([*lines, json.dumps(dup, ensure_ascii=False)]) + "\n", encoding="utf-8")
    stats = clean_corpus([str(raw)], tmp_path / "out", val_fraction=0.2, min_chars=50, progress=False)
    assert stats.documents == 61 and stats.duplicates == 1 and stats.train + stats.val == 60
    train = [json.loads(x) for x in (tmp_path / "out" / "train.jsonl").read_text().splitlines()]
    val = [json.loads(x) for x in (tmp_path / "out" / "val.jsonl").read_text().splitlines()]
    assert {d["id"] for d in val} == {d["id"] for d in train + val if is_validation(d["id"], 0.2)}
    assert not {d["id"] for d in val} & {d["id"] for d in train}
    assert sorted(d["text"] for d in train + val) == sorted(cleaned)


def test_tokenized_files_equal_the_tokenizer(prepared: dict[str, Path]) -> None:
    tokenizer = Tokenizer(prepared["tok"])
    meta = json.loads((prepared["tokens"] / "meta.json").read_text())
    for split in ("train", "val"):
        docs = list(read_documents([prepared["clean"] / f"{split}.jsonl"]))
        expected = [i for d in docs for i in [*tokenizer.encode(d.text), tokenizer.eos_id]]
        tokens = load_tokens(prepared["tokens"], split)
        assert isinstance(tokens, np.memmap) and tokens.dtype == np.uint16
        assert tokens.tolist() == expected
        assert meta["splits"][split] == {"tokens": len(expected), "documents": len(docs)}


def test_trained_tokenizer_loads_in_transformers(prepared: dict[str, Path]) -> None:
    transformers = pytest.importorskip("transformers")
    reference = transformers.AutoTokenizer.from_pretrained(prepared["tok"])
    ours = Tokenizer(prepared["tok"])
    texts = [d.text for d in read_documents([prepared["clean"] / "val.jsonl"])][:5]
    texts += ["未知の文字😀と改行\n\nと  空白", "ｶﾀｶﾅ ABC 123"]
    for text in texts:
        ids = ours.encode(text)
        assert ids == reference.encode(text, add_special_tokens=False)
        assert ours.decode(ids) == text  # byte fallback: nothing becomes <unk>
    assert ours.encode("😀") == [ours.token_to_id(f"<0x{b:02X}>") for b in "😀".encode()]
    assert ours.encode("a", add_special_tokens=True)[0] == ours.bos_id == reference.bos_token_id
    messages = [{"role": "user", "content": "日本の首都は？"}]
    from kataru.prompts import ChatTemplate

    style = ChatTemplate()
    rendered = style.render(style.messages(messages), ours)
    assert rendered == reference.apply_chat_template(style.messages(messages), tokenize=False,
                                                     add_generation_prompt=True)


def test_data_errors_are_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{not json\n', encoding="utf-8")
    empty = tmp_path / "empty.jsonl"
    empty.write_text("", encoding="utf-8")
    cases = [
        (["data", "clean", str(tmp_path / "missing.jsonl"), "--out", str(tmp_path / "o1")], "does not exist"),
        (["data", "clean", str(bad), "--out", str(tmp_path / "o2")], "bad.jsonl:2 is not valid JSON"),
        (["data", "clean", str(empty), "--out", str(tmp_path / "o3")], "no training documents"),
        (["pretrain", "--data", str(tmp_path / "nowhere"), "--out", str(tmp_path / "o4")], "does not exist"),
    ]
    for argv, message in cases:
        assert main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("kataru: error:") and message in err and "\n" not in err


def test_truncated_token_file_is_refused(prepared: dict[str, Path], tmp_path: Path) -> None:
    import shutil

    copy = tmp_path / "tokens"
    shutil.copytree(prepared["tokens"], copy)
    data = (copy / "train.bin").read_bytes()
    (copy / "train.bin").write_bytes(data[: len(data) // 2])
    with pytest.raises(KataruError, match="truncated"):
        load_tokens(copy, "train")


@pytest.mark.skipif(not (SHARED / "aozora").is_dir(), reason="../shared/data/aozora is absent (a fresh clone)")
def test_no_real_work_keeps_its_colophon(tmp_path: Path) -> None:
    """Every work of the shared sample, with notation or plain, loses the 底本/青空文庫 colophon and CR LF."""
    paths = sorted(str(p) for p in (SHARED / "aozora").glob("aozora-sample*.jsonl.gz"))
    clean_corpus(paths, tmp_path, val_fraction=0.02, progress=False)
    kept = []
    for split in ("train", "val"):
        for line in (tmp_path / f"{split}.jsonl").read_text(encoding="utf-8").splitlines():
            text = json.loads(line)["text"]
            assert "\r" not in text
            if "インターネットの図書館" in text or "\n底本：" in text:
                kept.append(json.loads(line)["id"])
    assert kept == []
