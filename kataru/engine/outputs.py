"""What a request makes of its logits: the sampled token, its text so far, and whether it is finished.

`accept` is the one place a request ends by itself: on an eos id or one of its stop token ids (unless
ignore_eos), at max_new_tokens or a full context, or when a stop string appears in its text. It also keeps
what the request asked to see of each token (its log-probability and the likeliest alternatives) and, for
a request with a grammar, masks out the tokens the grammar forbids. With a tokenizer the engine keeps each
request's text as it streams (`TextStream`): whole characters only (byte-fallback pieces wait for the
rest of their character), the prompt style's postprocessing applied (rinna's `<NL>`), and text that might
be the start of a stop string held back until it is known not to be one. What was shown is always a
prefix of the final text, so streamed pieces join to the completion.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from kataru.engine.scheduler import Request
from kataru.grammar import Grammars, Matcher
from kataru.sampling import pick_token, sampling_generator, seen_tokens
from kataru.tokenizer import StreamDecoder, Tokenizer


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


class TextStream:
    """One request's text as its tokens come."""

    def __init__(self, tokenizer: Tokenizer, stops: list[str], postprocess: Callable[[str], str]) -> None:
        self.decoder = StreamDecoder(tokenizer)
        self.stops, self.postprocess = stops, postprocess
        self.full = ""  # everything decoded so far
        self.text = ""  # what may be shown: `full` up to a stop string or a possible start of one
        self.stopped = False

    def push(self, token_id: int, is_eos: bool) -> bool:
        """Add a token's text (an eos token has none); True when a stop string appeared."""
        if not is_eos:
            self.full += self.postprocess(self.decoder.push(token_id))
        return self._update(final=False)

    def finish(self) -> None:
        """The request ended: the decoder's held bytes and held-back text become visible."""
        if not self.stopped:
            self.full += self.postprocess(self.decoder.flush())
            self._update(final=True)

    def _update(self, final: bool) -> bool:
        cut = find_stop(self.full, self.stops) if self.stops else None
        if cut is not None:
            self.text, self.stopped = self.full[:cut], True
            return True
        self.text = self.full if final else self.full[:len(self.full) - held_back(self.full, self.stops)]
        return False


@dataclass
class SamplingState:
    """A request's own RNG, the tokens its penalties apply to, its text and its place in a grammar."""

    generator: torch.Generator | None
    seen: Tensor  # [V] bool: prompt and answer (the repetition penalty)
    counts: Tensor | None  # [V] float: how often each token came in the answer (OpenAI's penalties)
    text: TextStream | None
    matcher: Matcher | None


def start(request: Request, vocab: int, device: torch.device, tokenizer: Tokenizer | None,
          postprocess: Callable[[str], str], grammars: Grammars | None = None) -> None:
    """Give an admitted request its sampling state (and text stream, when the engine has a tokenizer)."""
    params = request.params
    text = TextStream(tokenizer, params.stop, postprocess) if tokenizer is not None else None
    counts = (torch.zeros(vocab, device=device) if params.frequency_penalty or params.presence_penalty else None)
    matcher = grammars.matcher(params.grammar) if grammars is not None and params.grammar else None
    request.sampling = SamplingState(sampling_generator(params, device), seen_tokens(request.prompt, vocab, device),
                                     counts, text, matcher)


def accept(request: Request, logits: Tensor, eos_ids: set[int], context: int, proposal: int | None = None,
           draft: Tensor | None = None) -> str | None:
    """Sample the request's next token from its logits [V] and append it; the finish reason, if it ends. A
    speculative `proposal` (with the distribution it was drawn from) is kept or replaced by the rule that keeps
    the token a draw from the model's own distribution (`sampling.pick_token`)."""
    state: SamplingState = request.sampling
    params = request.params
    logits = logits.float()
    allowed = state.matcher.allowed(logits.shape[-1]).to(logits.device) if state.matcher is not None else None
    token = pick_token(logits, state.seen, params, state.generator, state.counts, allowed, proposal, draft)
    if params.logprobs is not None:  # the model's own distribution, before any sampling step (vLLM's default)
        logps = logits.log_softmax(-1)
        top = torch.topk(logps, params.logprobs) if params.logprobs else None
        request.logprobs.append((float(logps[token]), [] if top is None else
                                 list(zip(top.indices.tolist(), top.values.tolist(), strict=True))))
    if state.matcher is not None:
        state.matcher.consume(token)
    if token < state.seen.numel():
        state.seen[token] = True
        if state.counts is not None:
            state.counts[token] += 1
    request.tokens.append(token)
    is_eos = (token in eos_ids or token in params.stop_token_ids) and not params.ignore_eos
    reason = None
    if is_eos:
        reason = "stop"
    elif len(request.tokens) >= params.max_new_tokens or request.length + 1 >= context:
        reason = "length"
    if state.text is not None:
        if state.text.push(token, is_eos):
            reason = "stop"
        elif reason is not None:
            state.text.finish()
        request.text = state.text.text
    return reason
