"""How likely a model finds an answer after a prompt: the summed log-probability of the answer's tokens.

Training (SFT's loss mask, DPO's rewards, the DPO pairs' likeliest wrong choice) and evaluation (multiple
choice by log-likelihood) all score answers this way, with the prompt and padding positions masked out.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from kataru.tokenizer import Tokenizer

IGNORE = -100  # the target of a position that is not scored (prompt, padding), as torch's cross_entropy skips


def encode_answer(tokenizer: Tokenizer, answer: str) -> list[int]:
    """An answer's tokens, followed by eos: tokenized on its own, as generation continues a prompt."""
    eos = [] if tokenizer.eos_id is None else [tokenizer.eos_id]
    return tokenizer.encode(answer) + eos


def pad_batch(examples: list[tuple[list[int], list[int]]], pad_id: int, device: torch.device) -> dict[str, Tensor]:
    """(ids, labels) pairs as right-padded inputs and next-token targets; padding targets are IGNORE."""
    width = max(len(ids) for ids, _ in examples) - 1
    inputs = torch.full((len(examples), width), pad_id, dtype=torch.long)
    targets = torch.full((len(examples), width), IGNORE, dtype=torch.long)
    for row, (ids, labels) in enumerate(examples):
        n = len(ids) - 1
        inputs[row, :n] = torch.tensor(ids[:-1])
        targets[row, :n] = torch.tensor(labels[1:])
    return {"inputs": inputs.to(device), "targets": targets.to(device), "tokens": (targets != IGNORE).sum()}


def answer_logps(model: nn.Module, batch: dict[str, Tensor]) -> Tensor:
    """Sum of log p(answer token) per row; prompt and padding positions carry IGNORE targets."""
    logits = model(batch["inputs"]).float()
    targets = batch["targets"]
    mask = targets != IGNORE
    picked = torch.gather(logits.log_softmax(-1), -1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return (picked * mask).sum(-1)


@torch.no_grad()
def score_choices(model: nn.Module, tokenizer: Tokenizer, prompt: list[int], choices: list[str]) -> Tensor:
    """Each choice's summed log-probability as the answer to `prompt` (its own tokens, without eos)."""
    examples = []
    for choice in choices:
        answer = encode_answer(tokenizer, choice)[:-1] if tokenizer.eos_id is not None else tokenizer.encode(choice)
        examples.append((prompt + answer, [IGNORE] * len(prompt) + answer))
    device = next(model.parameters()).device
    return answer_logps(model, pad_batch(examples, tokenizer.pad_id or 0, device)).float()


@torch.no_grad()
def score_pairs(model: nn.Module, pairs: list[tuple[list[int], list[int]]], max_length: int,
                batch_size: int = 8) -> list[tuple[float, bool]]:
    """(summed log p of the continuation, whether greedy decoding gives it) for each (context ids,
    continuation ids) pair, the sequence cut on the left to `max_length` + 1 tokens (as the harnesses do).
    Pairs go `batch_size` at a time, right-padded; put those that share a context side by side."""
    out = []
    device = next(model.parameters()).device
    for i in range(0, len(pairs), batch_size):
        batch = pairs[i:i + batch_size]
        rows = [(context + continuation)[-(max_length + 1):] for context, continuation in batch]
        inputs = torch.zeros(len(rows), max(len(r) for r in rows) - 1, dtype=torch.long)
        for row, ids in enumerate(rows):
            inputs[row, :len(ids) - 1] = torch.tensor(ids[:-1])
        logps = model(inputs.to(device)).float().log_softmax(-1).cpu()
        for row, ((_, continuation), ids) in enumerate(zip(batch, rows, strict=True)):
            n = len(continuation)
            picked = logps[row, len(ids) - 1 - n:len(ids) - 1]
            targets = torch.tensor(continuation)
            out.append((float(picked.gather(-1, targets.unsqueeze(-1)).sum()),
                        bool((picked.argmax(-1) == targets).all())))
    return out
