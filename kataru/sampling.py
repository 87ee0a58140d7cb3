"""Sampling with transformers' semantics: what a card's `generate(...)` arguments mean, checked once.

Logits go through the same steps, in the same order, as `model.generate`: repetition penalty (CTRL rule
over prompt and output), temperature, top-k, top-p; then the most likely token (greedy) or a draw from
the request's own generator, so that a draw never depends on the batch it ran in.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import torch
from torch import Tensor

from kataru.errors import KataruError

# Below this a temperature divides float32 logits past their range (inf, then NaN probabilities).
MIN_TEMPERATURE = 1e-4
PENALTY_RANGE = (1e-3, 1e3)  # a penalty outside it turns logits of a few hundred into inf or zero
MAX_SEED = 2**63 - 1
MAX_LOGPROBS = 20  # top alternatives reported per token at most (OpenAI's limit for chat)


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
    stop_token_ids: list[int] = field(default_factory=list)  # more tokens that end the answer, as eos does
    frequency_penalty: float = 0.0  # OpenAI's: minus this times how often a token came in the answer so far
    presence_penalty: float = 0.0  # OpenAI's: minus this once a token came in the answer
    logprobs: int | None = None  # report each new token's log-probability and this many top alternatives
    grammar: str | None = None  # an llguidance grammar (JSON) the answer must follow (`kataru.grammar`)
    speculate: str | None = None  # ngram, draft or off: this request's speculative decoding (None: the engine's)

    @property
    def greedy(self) -> bool:
        return not self.do_sample or self.temperature == 0

    def validate(self) -> SamplingParams:
        """Refuse, in one line, any value that would fail or turn to NaN inside a step."""
        def number(value: Any, integral: bool = False) -> bool:
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                return False
            return isinstance(value, int) if integral else math.isfinite(value)

        low, high = PENALTY_RANGE
        checks = [
            (number(self.max_new_tokens, True) and self.max_new_tokens >= 1,
             f"max_new_tokens must be a whole number of at least 1, got {self.max_new_tokens!r}"),
            (number(self.temperature) and (self.temperature == 0 or self.temperature >= MIN_TEMPERATURE),
             f"temperature must be 0 (greedy) or at least {MIN_TEMPERATURE}, got {self.temperature!r}"),
            (number(self.top_k, True) and self.top_k >= 0,
             f"top_k must be a whole number >= 0 (0 turns it off), got {self.top_k!r}"),
            (number(self.top_p) and 0 < self.top_p <= 1, f"top_p must be in (0, 1], got {self.top_p!r}"),
            (number(self.repetition_penalty) and low <= self.repetition_penalty <= high,
             f"repetition_penalty must be in [{low}, {high}] (1 turns it off), got {self.repetition_penalty!r}"),
            (self.seed is None or (number(self.seed, True) and 0 <= self.seed <= MAX_SEED),
             f"seed must be a whole number in [0, 2**63 - 1], got {self.seed!r}"),
            (isinstance(self.stop, list) and all(isinstance(s, str) and s for s in self.stop),
             "stop strings must be non-empty strings"),
            (isinstance(self.do_sample, bool) and isinstance(self.ignore_eos, bool),
             "do_sample and ignore_eos must be true or false"),
            (isinstance(self.stop_token_ids, list) and all(number(t, True) and t >= 0 for t in self.stop_token_ids),
             "stop_token_ids must be a list of token ids"),
            (number(self.frequency_penalty) and -2 <= self.frequency_penalty <= 2,
             f"frequency_penalty must be in [-2, 2], got {self.frequency_penalty!r}"),
            (number(self.presence_penalty) and -2 <= self.presence_penalty <= 2,
             f"presence_penalty must be in [-2, 2], got {self.presence_penalty!r}"),
            (self.logprobs is None or (number(self.logprobs, True) and 0 <= self.logprobs <= MAX_LOGPROBS),
             f"logprobs must be a whole number in [0, {MAX_LOGPROBS}], got {self.logprobs!r}"),
            (self.grammar is None or isinstance(self.grammar, str), "grammar must be a string"),
            (self.speculate in (None, "off", "ngram", "draft"),
             f"speculate must be ngram, draft or off, got {self.speculate!r}"),
        ]
        for ok, message in checks:
            if not ok:
                raise KataruError(f"invalid sampling parameter: {message}")
        return self

    def updated(self, **overrides: Any) -> SamplingParams:
        """These parameters with the given ones replaced (None keeps the current value), validated."""
        unknown = set(overrides) - set(self.__dataclass_fields__)
        if unknown:
            raise KataruError(f"unknown sampling parameter(s) {', '.join(sorted(unknown))}; "
                              f"known: {', '.join(self.__dataclass_fields__)}")
        if isinstance(overrides.get("stop"), str):
            overrides["stop"] = [overrides["stop"]]
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


def apply_openai_penalties(logits: Tensor, counts: Tensor | None, frequency: float, presence: float) -> Tensor:
    """OpenAI's rule: logit - frequency * count - presence * (count > 0), over the answer's tokens so far."""
    if counts is None or (frequency == 0 and presence == 0):
        return logits
    return logits - frequency * counts - presence * (counts > 0).to(logits.dtype)


def process_logits(logits: Tensor, seen: Tensor, params: SamplingParams, counts: Tensor | None = None,
                   allowed: Tensor | None = None) -> Tensor:
    """Logits [V] (float32) after every step of transformers' processor list (OpenAI's penalties after the
    repetition penalty, as vLLM applies them); `allowed` [V] bool masks out what a grammar forbids before
    top-k and top-p choose among what is left."""
    logits = apply_repetition_penalty(logits, seen, params.repetition_penalty)
    logits = apply_openai_penalties(logits, counts, params.frequency_penalty, params.presence_penalty)
    if allowed is not None:
        logits = logits.masked_fill(~allowed, -math.inf)
    if params.greedy:
        return logits
    logits = logits / params.temperature
    return apply_top_p(apply_top_k(logits, params.top_k), params.top_p)


def pick_token(logits: Tensor, seen: Tensor, params: SamplingParams, generator: torch.Generator | None,
               counts: Tensor | None = None, allowed: Tensor | None = None, proposal: int | None = None,
               draft: Tensor | None = None) -> int:
    """The next token; `allowed` [V] bool: the tokens a grammar allows. With a speculative `proposal` (drawn from
    the distribution `draft`, None: proposed for certain, as prompt lookup does), sampling keeps it or draws
    another so that the token is still a draw from the model's distribution (`speculative_draw`); greedy
    decoding takes the model's own pick either way."""
    logits = process_logits(logits.float(), seen, params, counts, allowed)
    if params.greedy:
        return first_max(logits)
    probs = logits.softmax(dim=-1)
    if proposal is not None:
        return speculative_draw(probs, proposal, draft, generator)
    return int(torch.multinomial(probs, 1, generator=generator))


def speculative_draw(probs: Tensor, proposal: int, draft: Tensor | None, generator: torch.Generator | None) -> int:
    """Leviathan et al. 2023 / Chen et al. 2023: keep a proposal d drawn from q with probability min(1, p(d)/q(d)),
    else draw from (p - q)+ normalised. Then P(token = x) = min(p, q)(x) + (1 - sum min(p, q)) (p - q)+(x) /
    sum (p - q)+ = p(x): a draw from the model's p whatever q is. q = None is one-hot on d (a proposal that was
    certain): keep d with probability p(d), else draw from p without d."""
    p = float(probs[proposal])
    q = 1.0 if draft is None else float(draft[proposal])
    u = float(torch.rand((), generator=generator, device=probs.device))
    if u * q < p:
        return proposal
    if draft is None:
        residual = probs.clone()
        residual[proposal] = 0
    else:
        residual = (probs - draft).clamp_(min=0)
    total = float(residual.sum())
    if total <= 0:  # p == q (to rounding): nothing to correct, and the draw above keeps d with probability ~1
        return proposal
    return int(torch.multinomial(residual / total, 1, generator=generator))


def first_max(logits: Tensor) -> int:
    """The index of the largest logit, the first of equal ones (torch.argmax's rule): on the CPU numpy's
    vectorised argmax, some ten times faster than torch's over a 100k-token vocabulary (60 µs a row)."""
    if logits.device.type == "cpu" and logits.dtype in (torch.float32, torch.float64):  # numpy has no bf16
        return int(np.argmax(logits.detach().numpy()))
    return int(logits.argmax())


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
