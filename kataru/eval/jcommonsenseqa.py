"""JCommonsenseQA by log-likelihood: the choice whose answer tokens the model finds most likely wins.

Each question is rendered with the model's prompt style (the same wording kataru's SFT data uses) and
every choice is scored as the summed log-probability of its tokens after the prompt (`acc`, as
lm-evaluation-harness scores multiple choice) and per character (`acc_norm`). Random guessing is 20%.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from kataru.errors import KataruError

INSTRUCTION = "次の質問に、選択肢の中から最も適切なものを選んで答えてください。"
CHOICE_KEYS = [f"choice{i}" for i in range(5)]


def question_text(row: dict[str, Any]) -> str:
    choices = "、".join(row[k] for k in CHOICE_KEYS)
    return f"{INSTRUCTION}\n質問：{row['question']}\n選択肢：{choices}"


def read_questions(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        raise KataruError(f"{path} does not exist; pass JCommonsenseQA's valid-v1.3.json")
    rows = []
    with path.open(encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if line.strip():
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as err:
                    raise KataruError(f"{path}:{number} is not valid JSON ({err.msg})") from None
                if not all(k in row for k in ("question", "label", *CHOICE_KEYS)):
                    raise KataruError(f"{path}:{number} is not a JCommonsenseQA row (question, choice0-4, label)")
                rows.append(row)
    return rows


@torch.no_grad()
def evaluate(llm: Any, path: Path, limit: int | None = None, progress: bool = True) -> dict[str, Any]:
    """Accuracy of a loaded `kataru.LLM` on the questions in `path`."""
    from tqdm import tqdm

    from kataru.train.dpo import answer_logps
    from kataru.train.sft import encode_answer, pad_batch

    rows = read_questions(path)[:limit]
    tokenizer, model = llm.tokenizer, llm.model
    correct = correct_norm = 0
    for row in tqdm(rows, desc="JCommonsenseQA", unit="q", disable=not progress):
        prompt = llm.encode_prompt(question_text(row))
        examples = []
        for key in CHOICE_KEYS:
            answer = encode_answer(tokenizer, row[key])[:-1]  # the choice's tokens, without eos
            examples.append((prompt + answer, [-100] * len(prompt) + answer))
        batch = pad_batch(examples, tokenizer.pad_id or 0, torch.device(llm.model.tok_embeddings.weight.device))
        logps = answer_logps(model, batch).float()
        lengths = torch.tensor([len(row[k]) for k in CHOICE_KEYS], dtype=torch.float32)
        correct += int(logps.argmax()) == row["label"]
        correct_norm += int((logps / lengths).argmax()) == row["label"]
    n = len(rows)
    return {"task": "jcommonsenseqa", "questions": n, "acc": correct / n, "acc_norm": correct_norm / n,
            "random": 0.2}
