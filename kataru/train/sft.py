"""Supervised fine-tuning: conversations rendered with the model's prompt style, loss on the answer only.

The prompt is rendered exactly as generation renders it and tokenized on its own, and the answer is
tokenized separately and followed by eos, so training sees the same token boundary that inference
produces when it continues the prompt.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kataru.errors import KataruError
from kataru.prompts import PromptStyle
from kataru.tokenizer import Tokenizer
from kataru.train.data import open_text

IGNORE = -100


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        raise KataruError(f"data file {path} does not exist")
    rows = []
    try:
        with open_text(path) as f:
            for number, line in enumerate(f, 1):
                if line.strip():
                    try:
                        row = json.loads(line)
                    except json.JSONDecodeError as err:
                        raise KataruError(f"{path}:{number} is not valid JSON ({err.msg}); "
                                          "one object per line") from None
                    if not isinstance(row, dict):
                        raise KataruError(f"{path}:{number} is not a JSON object")
                    rows.append(row | {"_where": f"{path}:{number}"})
    except (OSError, EOFError, UnicodeDecodeError) as err:
        raise KataruError(f"cannot read {path} ({err}); the file is truncated or not UTF-8 JSONL") from None
    if not rows:
        raise KataruError(f"{path} holds no examples; the dataset is empty")
    return rows


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


def encode_prompt(style: PromptStyle, tokenizer: Tokenizer, messages: list[dict[str, str]],
                  inputs: str | None = None) -> list[int]:
    if inputs and style.name != "alpaca-ja":  # only the alpaca prompt has an 入力 field; others get it inline
        messages = [*messages[:-1], {**messages[-1], "content": f"{messages[-1]['content']}\n\n{inputs}"}]
        inputs = None
    text = style.render(style.messages(messages, inputs), tokenizer)
    return tokenizer.encode(text, add_special_tokens=style.add_special_tokens)


def encode_answer(tokenizer: Tokenizer, answer: str) -> list[int]:
    eos = [] if tokenizer.eos_id is None else [tokenizer.eos_id]
    return tokenizer.encode(answer) + eos


def encode_example(row: dict[str, Any], style: PromptStyle, tokenizer: Tokenizer,
                   max_len: int) -> tuple[list[int], list[int]] | None:
    """(token ids, labels with the prompt masked), or None when the prompt alone fills max_len."""
    messages, inputs = to_messages(row)
    prompt = encode_prompt(style, tokenizer, messages[:-1], inputs)
    answer = encode_answer(tokenizer, messages[-1]["content"])
    if len(prompt) >= max_len:
        return None
    ids = (prompt + answer)[:max_len + 1]
    labels = ([IGNORE] * len(prompt) + answer)[:max_len + 1]
    return ids, labels


def pad_batch(examples: list[tuple[list[int], list[int]]], pad_id: int, device: torch.device) -> dict[str, Tensor]:
    """Right-padded inputs/targets; padded and prompt positions carry IGNORE."""
    width = max(len(ids) for ids, _ in examples) - 1
    inputs = torch.full((len(examples), width), pad_id, dtype=torch.long)
    targets = torch.full((len(examples), width), IGNORE, dtype=torch.long)
    for row, (ids, labels) in enumerate(examples):
        n = len(ids) - 1
        inputs[row, :n] = torch.tensor(ids[:-1])
        targets[row, :n] = torch.tensor(labels[1:])
    return {"inputs": inputs.to(device), "targets": targets.to(device), "tokens": (targets != IGNORE).sum()}


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


class AdapterWeights:
    """Checkpoints of a LoRA run hold only the adapter (and its config, naming the base)."""

    def __init__(self, config: dict[str, Any]) -> None:
        self.config = config

    def save(self, model: nn.Module, folder: Path) -> None:
        from kataru.train.lora import save_adapter

        save_adapter(model, self.config, folder)

    def load(self, model: nn.Module, folder: Path) -> None:
        from kataru.train.lora import load_adapter, read_adapter_config

        saved = read_adapter_config(folder)
        keys = ("r", "alpha", "targets")
        if {k: saved.get(k) for k in keys} != {k: self.config[k] for k in keys}:
            raise KataruError(f"adapter in {folder} has another LoRA config; resume with the same --lora-* flags")
        load_adapter(model, folder)
