"""JGLUE's files (JSON lines, as the JGLUE repository publishes them): JCommonsenseQA questions and JSTS
sentence pairs, checked as they are read, and the one wording of a question that both kataru's SFT data
and its evaluation use."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from kataru.errors import KataruError
from kataru.files import iter_jsonl

INSTRUCTION = "次の質問に、選択肢の中から最も適切なものを選んで答えてください。"
CHOICE_KEYS = [f"choice{i}" for i in range(5)]


def question_text(row: dict[str, Any]) -> str:
    choices = "、".join(row[k] for k in CHOICE_KEYS)
    return f"{INSTRUCTION}\n質問：{row['question']}\n選択肢：{choices}"


def read_questions(path: Path) -> list[dict[str, Any]]:
    """JCommonsenseQA rows: question, choice0-4, label."""
    rows = []
    for number, row in iter_jsonl(path, "pass JCommonsenseQA's train-v1.3.json or valid-v1.3.json"):
        if not all(k in row for k in ("question", "label", *CHOICE_KEYS)) or row["label"] not in range(5):
            raise KataruError(f"{path}:{number} is not a JCommonsenseQA row (question, choice0-4, label 0-4)")
        rows.append(row)
    return rows


def read_pairs(path: Path) -> list[dict[str, Any]]:
    """JSTS rows: sentence1, sentence2, label (similarity 0-5)."""
    rows = []
    for number, row in iter_jsonl(path, "pass JSTS's train-v1.3.json or valid-v1.3.json"):
        if not isinstance(row.get("sentence1"), str) or not isinstance(row.get("sentence2"), str) \
                or not isinstance(row.get("label"), (int, float)):
            raise KataruError(f"{path}:{number} is not a JSTS row (sentence1, sentence2, numeric label)")
        rows.append(row)
    return rows
