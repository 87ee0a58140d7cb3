"""Corpus preparation: read documents, clean Aozora Bunko notation, deduplicate, split, tokenize.

Aozora notation (ruby 《》 and ｜, ［＃…］ notes, gaiji references) is parsed by the `aozora` package
(a maintained parser that also resolves gaiji like ※［＃「亞＋鳥」…］ to the real character); kataru
only turns its HTML into plain text and drops the notation legend at the head and the colophon
(底本：…) at the tail. Documents are deduplicated on their NFKC-normalised text and on their opening
and closing passages (the same work is often published twice, with and without ruby), split into train
and validation by a hash of the document id (so a work never straddles both), and tokenized in
parallel into flat token files that training reads through `numpy.memmap`.
"""

from __future__ import annotations

import hashlib
import html
import json
import os
import re
import unicodedata
from collections.abc import Iterable, Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from html.parser import HTMLParser
from multiprocessing import Pool
from pathlib import Path
from typing import Any

import numpy as np

from kataru.errors import KataruError
from kataru.files import atomic_output, check_input, iter_jsonl, read_json, write_json

LEGEND = "【テキスト中に現れる記号について】"
# The colophon ends with the 青空文庫 credit line and opens, within a few thousand characters before it, with
# 底本： or one of its variants (翻訳の底本：, 底本・初出：, 底本「, 定本：, 翻訳の原作：, 入力者注, ［＃本文終わり］).
CREDIT = re.compile(r"^.*青空文庫(?:作成|収録)ファイル|^このファイルは.*青空文庫", re.MULTILINE)
COLOPHON_OPENING = re.compile(
    r"^[ \t　]*(?:(?:翻訳の)?(?:底本|定本|原作)(?:・初出|の親本)?[：:「]|入力者注|［＃本文終わり］)", re.MULTILINE)
COLOPHON = re.compile(r"^[ \t　]*(?:翻訳の)?底本[：:]", re.MULTILINE)  # without a credit line: strictly 底本：
DASHES = re.compile(r"^-{20,}\s*$", re.MULTILINE)
RECIPE_VAL_FRACTION = 0.02  # the held-out share of recipes/train-kataru-tiny-ja.sh (and eval perplexity)


@dataclass
class Document:
    id: str
    text: str


def read_documents(paths: Iterable[str | Path], field: str = "text") -> Iterator[Document]:
    """Documents from .jsonl(.gz) files (one JSON object per line, text in `field`) or plain text files."""
    for path in map(Path, paths):
        check_input(path, fix="pass .jsonl, .jsonl.gz or .txt files")
        if ".jsonl" not in path.name and ".json" not in path.name:
            try:
                yield Document(str(path), path.read_text(encoding="utf-8"))
            except UnicodeDecodeError:
                raise KataruError(f"{path} is not UTF-8 text; convert it (e.g. iconv -f SHIFT_JIS)") from None
            continue
        for number, row in iter_jsonl(path):
            if not isinstance(row.get(field), str):
                raise KataruError(f"{path}:{number} has no string field {field!r}; choose the field that holds "
                                  "the text (--field)")
            doc_id = str(row.get("id") or row.get("path") or f"{path.name}:{number}")
            yield Document(doc_id, row[field])


class _HtmlText(HTMLParser):
    """Plain text from the aozora parser's HTML: ruby readings and hidden directives are dropped."""

    SKIP = frozenset({"rt", "rp"})

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.parts: list[str] = []
        self.skip: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if self.skip or tag in self.SKIP or any(name == "hidden" for name, _ in attrs):
            self.skip.append(tag)
        elif tag == "br":
            self.parts.append("\n")

    def handle_startendtag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag == "br" and not self.skip:
            self.parts.append("\n")

    def handle_endtag(self, tag: str) -> None:
        if self.skip:
            if self.skip[-1] == tag:
                self.skip.pop()
            return
        if tag == "p":
            self.parts.append("\n")

    def handle_data(self, data: str) -> None:
        if not self.skip:
            self.parts.append(data.replace("\n", ""))


def normalize_newlines(text: str) -> str:
    """CR LF (most Aozora files) and bare CR (a few old ones) become LF."""
    return text.replace("\r\n", "\n").replace("\r", "\n")


def is_aozora(text: str) -> bool:
    """Aozora notation, or a plain work (no ruby, no notes) that still carries the Aozora colophon."""
    return (LEGEND in text or "［＃" in text or bool(re.search(r"《[^》\n]{1,30}》", text))
            or CREDIT.search(text) is not None)


def colophon_start(text: str) -> int | None:
    """Where the colophon (底本… through the 青空文庫 credit) begins, or None."""
    credits = list(CREDIT.finditer(text))
    if credits:
        end = credits[-1].start()
        begin = max(0, end - 4000)
        opening = COLOPHON_OPENING.search(text, begin, end)
        return opening.start() if opening else end
    strict = COLOPHON.search(text)
    return strict.start() if strict else None


def clean_aozora(text: str) -> str:
    """An Aozora Bunko file as plain text: title lines and body, no notation, legend or colophon."""
    try:
        import aozora
    except ImportError:
        raise KataruError("cleaning Aozora Bunko text needs the aozora parser: pip install -e '.[train]' in the "
                          "kataru checkout") from None
    text = normalize_newlines(text)
    colophon = colophon_start(text)
    if colophon is not None:
        text = text[:colophon]
    if LEGEND in text:  # title lines, then the legend fenced by two dashed lines
        fences = list(DASHES.finditer(text))
        if len(fences) >= 2:
            text = text[:fences[0].start()] + text[fences[1].end():]
    parser = _HtmlText()
    parser.feed(aozora.Document(text).to_html())
    parser.close()
    plain = html.unescape("".join(parser.parts))
    plain = re.sub(r"[ \t]+\n", "\n", plain)
    return re.sub(r"\n{3,}", "\n\n", plain).strip()


def normalize_for_dedup(text: str) -> str:
    return re.sub(r"\s+", "", unicodedata.normalize("NFKC", text))


def dedup_keys(text: str, edge: int = 1000) -> tuple[str, str]:
    norm = normalize_for_dedup(text)
    full = hashlib.sha1(norm.encode()).hexdigest()
    edges = hashlib.sha1((norm[:edge] + "\0" + norm[-edge:]).encode()).hexdigest()
    return full, edges


def is_validation(doc_id: str, fraction: float) -> bool:
    """A stable, id-based split: a document lands in the same split on every run and machine."""
    bucket = int.from_bytes(hashlib.sha1(doc_id.encode()).digest()[:8], "big") / 2**64
    return bucket < fraction


@dataclass
class CleanStats:
    documents: int = 0
    duplicates: int = 0
    too_short: int = 0
    train: int = 0
    val: int = 0
    train_chars: int = 0
    val_chars: int = 0


def clean_corpus(paths: list[str], out: Path, val_fraction: float = 0.01, min_chars: int = 200,
                 field: str = "text", aozora: str = "auto", progress: bool = True) -> CleanStats:
    """Write out/train.jsonl and out/val.jsonl: cleaned, deduplicated documents split by id."""
    from tqdm import tqdm

    if not 0 <= val_fraction < 1:
        raise KataruError(f"--val-fraction must be in [0, 1), got {val_fraction}")
    out.mkdir(parents=True, exist_ok=True)
    stats, seen = CleanStats(), set()
    with ExitStack() as stack:
        files = {split: stack.enter_context(atomic_output(out / f"{split}.jsonl")) for split in ("train", "val")}
        for doc in tqdm(read_documents(paths, field), desc="clean", unit="doc", disable=None if progress else True):
            stats.documents += 1
            text = normalize_newlines(doc.text)
            aozora_doc = aozora == "always" or (aozora == "auto" and is_aozora(text))
            text = clean_aozora(text) if aozora_doc else text.strip()
            if len(text) < min_chars:
                stats.too_short += 1
                continue
            keys = dedup_keys(text)
            if keys[0] in seen or keys[1] in seen:
                stats.duplicates += 1
                continue
            seen.update(keys)
            split = "val" if is_validation(doc.id, val_fraction) else "train"
            files[split].write(json.dumps({"id": doc.id, "text": text}, ensure_ascii=False) + "\n")
            setattr(stats, split, getattr(stats, split) + 1)
            setattr(stats, f"{split}_chars", getattr(stats, f"{split}_chars") + len(text))
        if stats.train == 0:  # raised inside the block: neither split is written
            raise KataruError(f"no training documents left out of {stats.documents} ({stats.too_short} shorter "
                              f"than {min_chars} characters, {stats.duplicates} duplicates)")
    write_json(out / "stats.json", vars(stats))
    return stats


# --- tokenization into flat token files -------------------------------------------------------------

_worker_tokenizer: Any = None


def _init_worker(folder: str) -> None:
    global _worker_tokenizer
    from kataru.tokenizer import Tokenizer

    _worker_tokenizer = Tokenizer(folder)


def _encode(text: str) -> list[int]:
    return _worker_tokenizer.encode(text)


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16 if vocab_size <= 65536 else np.uint32)


def tokenize_corpus(folder: Path, tokenizer_folder: Path, out: Path, workers: int | None = None,
                    field: str = "text", progress: bool = True) -> dict[str, Any]:
    """Tokenize folder/{train,val}.jsonl into out/{train,val}.bin: documents joined by eos."""
    from tqdm import tqdm

    from kataru.tokenizer import Tokenizer

    tokenizer = Tokenizer(tokenizer_folder)
    eos = tokenizer.eos_id
    if eos is None:
        raise KataruError(f"the tokenizer in {tokenizer_folder} has no eos token to separate documents")
    dtype = token_dtype(tokenizer.vocab_size)
    out.mkdir(parents=True, exist_ok=True)
    meta: dict[str, Any] = {"dtype": dtype.name, "vocab_size": tokenizer.vocab_size, "eos_token_id": eos,
                            "tokenizer": str(tokenizer_folder), "splits": {}}
    workers = workers or max(1, min(os.cpu_count() or 1, 8))
    with Pool(workers, initializer=_init_worker, initargs=(str(tokenizer_folder),)) as pool:
        for split in ("train", "val"):
            source = folder / f"{split}.jsonl"
            if not source.is_file():
                raise KataruError(f"{source} is missing; run `kataru data clean` first")
            texts = (doc.text for doc in read_documents([source], field))
            count, docs = 0, 0
            with atomic_output(out / f"{split}.bin", "wb") as f, tqdm(
                    desc=f"tokenize {split}", unit="tok", unit_scale=True, disable=None if progress else True) as bar:
                for ids in pool.imap(_encode, texts, chunksize=4):
                    np.asarray([*ids, eos], dtype=dtype).tofile(f)
                    count += len(ids) + 1
                    docs += 1
                    bar.update(len(ids) + 1)
            meta["splits"][split] = {"tokens": count, "documents": docs}
    if meta["splits"]["train"]["tokens"] == 0:
        raise KataruError(f"{folder}/train.jsonl holds no documents; the dataset is empty")
    write_json(out / "meta.json", meta)
    return meta


def load_tokens(folder: Path, split: str) -> np.ndarray:
    """A split's token file as a read-only memmap."""
    meta_path = folder / "meta.json"
    if not meta_path.is_file():
        raise KataruError(f"{folder} has no meta.json; prepare it with `kataru data tokenize`")
    meta = read_json(meta_path, "prepare the data again with `kataru data tokenize`")
    try:
        dtype, tokens = np.dtype(meta["dtype"]), int(meta["splits"][split]["tokens"])
    except (KeyError, TypeError, ValueError) as err:
        raise KataruError(f"{meta_path} is malformed ({err}); prepare the data again") from None
    path = folder / f"{split}.bin"
    if not path.is_file() or path.stat().st_size != tokens * dtype.itemsize:
        raise KataruError(f"{path} is missing or truncated (expected {tokens} tokens); prepare the data again")
    if tokens == 0:
        raise KataruError(f"{path} holds no tokens; the {split} split is empty")
    return np.memmap(path, dtype=dtype, mode="r", shape=(tokens,))
