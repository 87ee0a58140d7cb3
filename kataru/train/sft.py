"""Supervised fine-tuning: conversations rendered with the model's prompt style, loss on the answer only.

The prompt is rendered exactly as generation renders it and tokenized on its own, and the answer is
tokenized separately and followed by eos, so training sees the same token boundary that inference
produces when it continues the prompt.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kataru.errors import KataruError
from kataru.prompts import PromptStyle
from kataru.scoring import IGNORE, encode_answer, pad_batch
from kataru.tokenizer import Tokenizer


def to_messages(row: dict[str, Any]) -> tuple[list[dict[str, str]], str | None]:
    """(conversation up to the answer, alpaca 入力) from a `messages` or instruction/input/output row."""
    where = row.get("_where", "example")
    if "messages" in row:
        messages = row["messages"]
        if not isinstance(messages, list) or not messages or not isinstance(messages[-1], dict) \
                or messages[-1].get("role") != "assistant":
            raise KataruError(f"{where}: messages must be a list ending with the assistant's answer")
        return [dict(m) for m in messages], None
    if isinstance(row.get("instruction"), str) and isinstance(row.get("output"), str):
        inputs = row.get("input") or None
        user, answer = row["instruction"], row["output"]
        return [{"role": "user", "content": user}, {"role": "assistant", "content": answer}], inputs
    raise KataruError(f"{where}: needs `messages` or `instruction` and `output` fields")


def encode_conversation(style: PromptStyle, tokenizer: Tokenizer, messages: list[dict[str, str]],
                        inputs: str | None = None) -> list[int]:
    """The prompt tokens of a training conversation. Unlike `LLM.encode_prompt`, which refuses an 入力 outside
    the alpaca-ja style, a training row's input joins its instruction in the styles without the field."""
    if inputs and style.name != "alpaca-ja":  # only the alpaca prompt has an 入力 field; others get it inline
        messages = [*messages[:-1], {**messages[-1], "content": f"{messages[-1]['content']}\n\n{inputs}"}]
        inputs = None
    text = style.render(style.messages(messages, inputs), tokenizer)
    return tokenizer.encode(text, add_special_tokens=style.add_special_tokens)


def encode_example(row: dict[str, Any], style: PromptStyle, tokenizer: Tokenizer,
                   max_len: int) -> tuple[list[int], list[int]] | None:
    """(token ids, labels with the prompt masked), or None when the prompt alone fills max_len."""
    messages, inputs = to_messages(row)
    prompt = encode_conversation(style, tokenizer, messages[:-1], inputs)
    answer = encode_answer(tokenizer, messages[-1]["content"])
    if len(prompt) >= max_len:
        return None
    ids = (prompt + answer)[:max_len + 1]
    labels = ([IGNORE] * len(prompt) + answer)[:max_len + 1]
    return ids, labels


class SFTTask:
    def __init__(self, rows: list[dict[str, Any]], style: PromptStyle, tokenizer: Tokenizer, max_len: int,
                 weights: Any, val_fraction: float = 0.02) -> None:
        encoded = [e for e in (encode_example(r, style, tokenizer, max_len) for r in rows) if e is not None]
        if not encoded:
            raise KataruError(f"no example fits in --seq-len {max_len} tokens; raise --seq-len")
        n_val = min(int(len(encoded) * val_fraction), 200) if len(encoded) >= 20 else 0
        self.val, self.train = encoded[:n_val], encoded[n_val:]
        self.num_samples = len(self.train)
        self.skipped = len(rows) - len(encoded)
        self.pad_id = tokenizer.pad_id if tokenizer.pad_id is not None else (tokenizer.eos_id or 0)
        self.weights = weights

    def batch(self, indices: list[int], device: torch.device) -> dict[str, Tensor]:
        return pad_batch([self.train[i] for i in indices], self.pad_id, device)

    def loss(self, model: nn.Module, batch: dict[str, Tensor]) -> tuple[Tensor, dict[str, float]]:
        logits = model(batch["inputs"])
        return F.cross_entropy(logits.flatten(0, 1).float(), batch["targets"].flatten(), ignore_index=IGNORE), {}

    def evaluate(self, model: nn.Module, device: torch.device) -> dict[str, float]:
        if not self.val:
            return {}
        total, count = 0.0, 0
        for start in range(0, len(self.val), 8):
            batch = pad_batch(self.val[start:start + 8], self.pad_id, device)
            logits = model(batch["inputs"])
            total += F.cross_entropy(logits.flatten(0, 1).float(), batch["targets"].flatten(),
                                     ignore_index=IGNORE, reduction="sum").item()
            count += int(batch["tokens"])
        return {"val_loss": total / count}

    def save(self, model: nn.Module, folder: Path) -> None:
        self.weights.save(model, folder)

    def load(self, model: nn.Module, folder: Path) -> None:
        self.weights.load(model, folder)
