"""Instruction data derived from the real corpora, as llm-jp's jaster derives it from JGLUE (`kataru data sft`).

- JCommonsenseQA train: the question with its five choices -> the correct choice (the same wording
  `kataru eval jcommonsenseqa` uses on the validation split, which is never trained on).
- JSTS train: two sentences -> their similarity on the 0-5 scale, one decimal.
- Aozora Bunko (cleaned train split): 「title」(author) -> the work's opening sentences; and a passage
  -> the sentences that follow it.
Rows are `messages` JSONL; the order is shuffled with a fixed seed.
"""

from __future__ import annotations

import json
import random
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from kataru.data.corpus import read_documents
from kataru.data.jglue import question_text, read_pairs, read_questions
from kataru.errors import KataruError
from kataru.files import atomic_output

SENTENCE = re.compile(r"[^。！？\n]*[。！？]")


def _chat(user: str, answer: str, source: str) -> dict[str, Any]:
    return {"messages": [{"role": "user", "content": user}, {"role": "assistant", "content": answer}],
            "source": source}


def from_jcommonsenseqa(path: Path) -> Iterator[dict[str, Any]]:
    for row in read_questions(path):
        choices = [row[f"choice{i}"] for i in range(5)]
        yield _chat(question_text(row), choices[row["label"]], "jcommonsenseqa") | {"choices": choices}


def from_jsts(path: Path) -> Iterator[dict[str, Any]]:
    for row in read_pairs(path):
        user = ("次の2つの文の意味がどのくらい似ているかを、"
                "0（無関係）から5（同じ意味）の数値で答えてください。\n"
                f"文1：{row['sentence1']}\n文2：{row['sentence2']}")
        yield _chat(user, f"{float(row['label']):.1f}", "jsts") | {"score": float(row["label"])}


def _sentences(text: str, limit: int) -> str:
    out = ""
    for match in SENTENCE.finditer(text):
        piece = match.group().strip()
        if out and len(out) + len(piece) > limit:
            break
        out += piece
    return out


def from_aozora(path: Path, rng: random.Random, continuations: int = 2) -> Iterator[dict[str, Any]]:
    for doc in read_documents([path]):
        lines = [line.strip() for line in doc.text.split("\n") if line.strip()]
        if len(lines) < 4:
            continue
        title, author = lines[0], lines[1]
        body = "\n".join(lines[2:])
        # Skip a translator or editor line between the author and the text.
        if len(lines[2]) < 20 and not lines[2].endswith("。"):
            body = "\n".join(lines[3:])
        opening = _sentences(body, 120)
        if len(title) <= 40 and len(author) <= 30 and opening:
            yield _chat(f"{author}の「{title}」の書き出しを書いてください。", opening, "aozora-opening")
        for _ in range(continuations):
            if len(body) < 400:
                break
            start = rng.randrange(0, len(body) - 300)
            passage = _sentences(body[start:], 120)
            follow = _sentences(body[start + len(passage):], 120) if passage else ""
            if passage and follow:
                yield _chat(f"次の文章の続きを書いてください。\n{passage}", follow, "aozora-continuation")


def derive_sft(out: Path, jglue: Path | None, aozora: Path | None, seed: int = 0,
               max_examples: int | None = None) -> dict[str, int]:
    rng = random.Random(seed)
    rows: list[dict[str, Any]] = []
    if jglue is not None:
        jcqa = jglue / "jcommonsenseqa-v1.3" / "train-v1.3.json"
        jsts = jglue / "jsts-v1.3" / "train-v1.3.json"
        for path, reader in ((jcqa, from_jcommonsenseqa), (jsts, from_jsts)):
            if not path.is_file():
                raise KataruError(f"{path} is missing; pass the JGLUE datasets folder with --jglue")
            rows += list(reader(path))
    if aozora is not None:
        rows += list(from_aozora(aozora, rng))
    if not rows:
        raise KataruError("no source given: pass --jglue and/or --aozora")
    rng.shuffle(rows)
    rows = rows[:max_examples]
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_output(out) as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    counts: dict[str, int] = {}
    for row in rows:
        counts[row["source"]] = counts.get(row["source"], 0) + 1
    return counts
