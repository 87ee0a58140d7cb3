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
    Pairs go `batch_size` at a time, right-padded (`pad_batch`)."""
    out = []
    device = next(model.parameters()).device
    for i in range(0, len(pairs), batch_size):
        examples = []
        for context, continuation in pairs[i:i + batch_size]:
            ids = (context + continuation)[-(max_length + 1):]
            examples.append((ids, [IGNORE] * (len(ids) - len(continuation)) + continuation))
        batch = pad_batch(examples, 0, device)
        logps = model(batch["inputs"]).float().log_softmax(-1)
        targets = batch["targets"]
        mask = targets != IGNORE
        picked = torch.gather(logps, -1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
        sums = (picked * mask).sum(-1).tolist()
        greedy = ((logps.argmax(-1) == targets) | ~mask).all(-1).tolist()
        out += list(zip(sums, greedy, strict=True))
    return out


@torch.no_grad()
def score_shared(model: nn.Module, context: list[int], continuations: list[list[int]],
                 max_length: int) -> list[tuple[float, bool]]:
    """`score_pairs` for continuations of one context (a question's choices), computing the context once: it is
    prefilled into one cache row, copied into a row per continuation, and the continuations' tokens then go
    one decode step at a time for all rows together, as the engine decodes a batch. The context is cut on the
    left so that the longest continuation fits in `max_length` tokens."""
    from kataru.model import KVCache

    longest = max(len(c) for c in continuations)
    context = context[-(max_length - longest):] if len(context) + longest > max_length else context
    weight = model.tok_embeddings.weight
    width = len(context)
    cache = KVCache(model.config, len(continuations), width + longest, weight.dtype, weight.device)
    first = model.prefill(torch.tensor([context], device=weight.device), cache, 0, 0)[0].float().log_softmax(-1)
    for k, v in zip(cache.k, cache.v, strict=True):
        k[1:, :, :width] = k[0, :, :width]
        v[1:, :, :width] = v[0, :, :width]
    totals = [float(first[c[0]]) for c in continuations]
    greedy = [int(first.argmax()) == c[0] for c in continuations]
    for t in range(longest - 1):  # token t of every continuation that has a token t + 1 to predict
        active = [r for r, c in enumerate(continuations) if len(c) > t + 1]
        tokens = torch.tensor([[continuations[r][t]] for r in active], device=weight.device)
        rows = torch.tensor(active, device=weight.device)
        slots = torch.full((len(active),), width + t, device=weight.device)
        logps = model.decode(tokens, cache, rows, slots, width + t + 1).float().log_softmax(-1)
        for i, r in enumerate(active):
            target = continuations[r][t + 1]
            totals[r] += float(logps[i, target])
            greedy[r] = greedy[r] and int(logps[i].argmax()) == target
    return list(zip(totals, greedy, strict=True))
