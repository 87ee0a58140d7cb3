"""JCommonsenseQA by log-likelihood: the choice whose answer tokens the model finds most likely wins.

Each question is rendered with the model's prompt style (the same wording kataru's SFT data uses) and
every choice is scored as the summed log-probability of its tokens after the prompt (`acc`, as
lm-evaluation-harness scores multiple choice) and per character (`acc_norm`). Random guessing is 20%.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from kataru.data.jglue import CHOICE_KEYS, question_text, read_questions
from kataru.scoring import score_choices


def evaluate(llm: Any, path: Path, limit: int | None = None, progress: bool = True) -> dict[str, Any]:
    """Accuracy of a loaded `kataru.LLM` on the questions in `path`."""
    rows = read_questions(path)[:limit]
    correct = correct_norm = 0
    for row in tqdm(rows, desc="JCommonsenseQA", unit="q", disable=not progress):
        logps = score_choices(llm.model, llm.tokenizer, llm.encode_prompt(question_text(row)),
                              [row[k] for k in CHOICE_KEYS])
        lengths = torch.tensor([len(row[k]) for k in CHOICE_KEYS], dtype=torch.float32)
        correct += int(logps.argmax()) == row["label"]
        correct_norm += int((logps / lengths).argmax()) == row["label"]
    n = len(rows)
    return {"task": "jcommonsenseqa", "questions": n, "acc": correct / n, "acc_norm": correct_norm / n,
            "random": 0.2}
