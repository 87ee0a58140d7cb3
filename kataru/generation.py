"""Sampling with transformers' semantics, and the prefill + decode loop over a preallocated KV cache.

Logits go through the same steps, in the same order, as `model.generate`: repetition penalty (CTRL rule
over prompt and output), temperature, top-k, top-p. Each row of a batch has its own parameters, seed
and stop conditions; rows are left-padded so that a batch gives what each prompt gives alone.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import Tensor

from kataru.errors import KataruError
from kataru.model import Transformer


@dataclass
class SamplingParams:
    """What a card's `generate(...)` call says; temperature 0 (or do_sample False) means greedy."""

    max_new_tokens: int = 128
    temperature: float = 1.0
    top_k: int = 50  # transformers' default when sampling; 0 turns it off
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    do_sample: bool = True
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    ignore_eos: bool = False

    @property
    def greedy(self) -> bool:
        return not self.do_sample or self.temperature == 0

    def validate(self) -> SamplingParams:
        checks = [
            (self.max_new_tokens >= 1, f"max_new_tokens must be at least 1, got {self.max_new_tokens}"),
            (math.isfinite(self.temperature) and self.temperature >= 0,
             f"temperature must be >= 0 (0 means greedy), got {self.temperature}"),
            (self.top_k >= 0, f"top_k must be >= 0 (0 turns it off), got {self.top_k}"),
            (0 < self.top_p <= 1, f"top_p must be in (0, 1], got {self.top_p}"),
            (math.isfinite(self.repetition_penalty) and self.repetition_penalty > 0,
             f"repetition_penalty must be > 0 (1 turns it off), got {self.repetition_penalty}"),
            (all(isinstance(s, str) and s for s in self.stop), "stop strings must be non-empty strings"),
        ]
        for ok, message in checks:
            if not ok:
                raise KataruError(f"invalid sampling parameter: {message}")
        return self

    def updated(self, **overrides: Any) -> SamplingParams:
        unknown = set(overrides) - set(self.__dataclass_fields__)
        if unknown:
            raise KataruError(f"unknown sampling parameter(s) {', '.join(sorted(unknown))}; "
                              f"known: {', '.join(self.__dataclass_fields__)}")
        return replace(self, **{k: v for k, v in overrides.items() if v is not None}).validate()


def apply_repetition_penalty(logits: Tensor, seen: Tensor, penalty: float) -> Tensor:
    """CTRL rule: a seen token's logit is divided by the penalty if positive, multiplied if not."""
    if penalty == 1.0:
        return logits
    penalized = torch.where(logits > 0, logits / penalty, logits * penalty)
    return torch.where(seen, penalized, logits)


def apply_top_k(logits: Tensor, top_k: int) -> Tensor:
    if top_k <= 0 or top_k >= logits.shape[-1]:
        return logits
    kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
    return logits.masked_fill(logits < kth, -math.inf)


def apply_top_p(logits: Tensor, top_p: float) -> Tensor:
    """Keep the smallest set whose probability reaches top_p (transformers' ascending-sort rule)."""
    if top_p >= 1.0:
        return logits
    sorted_logits, sorted_idx = torch.sort(logits, descending=False, dim=-1)
    cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
    remove = cumulative <= (1 - top_p)
    remove[..., -1:] = False
    return logits.masked_fill(remove.scatter(-1, sorted_idx, remove), -math.inf)


def process_logits(logits: Tensor, seen: Tensor, params: SamplingParams) -> Tensor:
    """Logits [V] (float32) after every step of transformers' processor list."""
    logits = apply_repetition_penalty(logits, seen, params.repetition_penalty)
    if params.greedy:
        return logits
    logits = logits / params.temperature
    return apply_top_p(apply_top_k(logits, params.top_k), params.top_p)


def pick_token(logits: Tensor, seen: Tensor, params: SamplingParams, generator: torch.Generator | None) -> int:
    logits = process_logits(logits.float(), seen, params)
    if params.greedy:
        return int(logits.argmax())
    probs = logits.softmax(dim=-1)
    return int(torch.multinomial(probs, 1, generator=generator))


def seen_tokens(ids: list[int], vocab: int, device: torch.device) -> Tensor:
    """[vocab] bool: the tokens the repetition penalty applies to (those of the prompt, to start with)."""
    seen = torch.zeros(vocab, dtype=torch.bool, device=device)
    seen[torch.tensor([i for i in ids if i < vocab], dtype=torch.long, device=device)] = True
    return seen


def sampling_generator(params: SamplingParams, device: torch.device) -> torch.Generator | None:
    """A request's own RNG (seeded when asked), so sampling never depends on its batch neighbours."""
    if params.greedy:
        return None
    generator = torch.Generator(device=device)
    generator.manual_seed(params.seed if params.seed is not None else int(torch.randint(0, 2**62, (1,))))
    return generator


@dataclass
class Step:
    """One new token; `row` is the batch row (decode_steps) or the request id (Engine).

    `finish_reason` is set on the last step of that row or request.
    """

    row: int
    token_id: int
    finish_reason: str | None = None


def check_context(prompt_len: int, max_seq_len: int) -> None:
    if prompt_len == 0:
        raise KataruError("the prompt is empty; give some text (or use the raw prompt style with special tokens)")
    if prompt_len >= max_seq_len:
        raise KataruError(f"the prompt is {prompt_len} tokens, longer than the model's context of {max_seq_len} "
                          "(the prompt and at least one new token must fit); shorten the prompt")


@torch.inference_mode()
def decode_steps(model: Transformer, prompts: list[list[int]], params: list[SamplingParams], eos_ids: set[int],
                 use_cache: bool = True, finished: set[int] | None = None) -> Iterator[Step]:
    """Prefill every prompt (left-padded), then decode one token per live row per step.

    Rows stop on an eos id (unless ignore_eos), at max_new_tokens, or when the context is full. Stop
    strings need text, so the caller checks them and adds the row to `finished` to end it.
    """
    finished = finished if finished is not None else set()
    max_seq_len = model.config.max_seq_len
    for p in prompts:
        check_context(len(p), max_seq_len)
    device = model.tok_embeddings.weight.device
    lengths = torch.tensor([len(p) for p in prompts], device=device)
    b, width = len(prompts), int(lengths.max())
    budget = [min(p.max_new_tokens, max_seq_len - len(ids)) for p, ids in zip(params, prompts, strict=False)]
    total = width + max(budget)
    tokens = torch.zeros(b, total, dtype=torch.long, device=device)
    for row, ids in enumerate(prompts):
        tokens[row, width - len(ids):width] = torch.tensor(ids, device=device)
    pad = width - lengths
    slots = torch.arange(total, device=device)
    positions = (slots.unsqueeze(0) - pad.unsqueeze(1)).clamp(min=0)
    key_mask = (slots.unsqueeze(0) >= pad.unsqueeze(1)) if bool((pad > 0).any()) else None

    vocab = model.config.vocab_size
    seen = torch.stack([seen_tokens(ids, vocab, device) for ids in prompts])
    generators = [sampling_generator(p, device) for p in params]

    if use_cache:
        model.setup_caches(b, total)
        model.cache_owner = None  # an Engine must not trust what its rows held before
        logits = model(tokens[:, :width], positions[:, :width], start=0, key_mask=key_mask, last_only=True)
    else:
        logits = model(tokens[:, :width], positions[:, :width], key_mask=key_mask, last_only=True)
    alive = [True] * b
    produced = [0] * b
    for step in range(max(budget)):
        current = width + step
        for row in range(b):
            if row in finished:
                alive[row] = False
            if not alive[row]:
                continue
            token = pick_token(logits[row, -1], seen[row], params[row], generators[row])
            tokens[row, current] = token
            if token < vocab:
                seen[row, token] = True
            produced[row] += 1
            reason = None
            if token in eos_ids and not params[row].ignore_eos:
                reason = "stop"
            elif produced[row] >= budget[row]:
                reason = "length"
            if reason:
                alive[row] = False
            yield Step(row, token, reason)
        if not any(alive[row] and row not in finished for row in range(b)):
            return
        if use_cache:
            logits = model(tokens[:, current:current + 1], positions[:, current:current + 1], start=current,
                           key_mask=key_mask)
        else:
            logits = model(tokens[:, :current + 1], positions[:, :current + 1],
                           key_mask=None if key_mask is None else key_mask[:, :current + 1], last_only=True)


def find_stop(text: str, stops: list[str]) -> int | None:
    """Where the earliest stop string begins in text, or None."""
    hits = [i for i in (text.find(s) for s in stops) if i >= 0]
    return min(hits) if hits else None


def held_back(text: str, stops: list[str]) -> int:
    """How many trailing characters might be the start of a stop string and must wait."""
    longest = 0
    for s in stops:
        for n in range(min(len(s) - 1, len(text)), longest, -1):
            if text.endswith(s[:n]):
                longest = n
                break
    return longest
