"""The engine: requests in, tokens and text out, with continuous batching over a KV cache it owns.

A step is `schedule -> run -> update`, as vLLM's EngineCore.step: the scheduler (pure bookkeeping) says
which prompt chunks to prefill and which requests to decode, the runner carries that out on the model,
and the outputs sample each request's token, extend its text and decide whether it is finished. A new
request joins the running batch at the next step; a finished or cancelled one frees its row at once.
Greedy results equal running each request alone, in any batch, chunked or after a reused prefix.

Many callers at once is the normal case. `submit` and `cancel` never wait for a step: they leave the
request (or the cancel) in an inbox the next step takes in. Steps run one at a time under a lock, on
whichever thread asks for progress: `wait` and `follow` (threads, interleaved generators) step until
their request has what they wait for, serving every other request on the way, and `async for token in
engine.stream(request)` steps on one worker thread so that an event loop stays free while a step
computes. A cancel asked for during a step takes effect when it ends.

Bad input never reaches a step: prompts are checked (token ids in the vocabulary, length within the
context) and sampling parameters validated when submitted. A request whose logits turn NaN or infinite
ends alone with an error; an error inside the model ends the requests of that forward, each with one
line saying why, and every other request goes on.
"""

from __future__ import annotations

import asyncio
import itertools
import math
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import aclosing
from dataclasses import dataclass
from typing import Any

import torch

from kataru import dispatch
from kataru.engine import outputs
from kataru.engine.runner import Runner, reason
from kataru.engine.scheduler import Request, Resize, Scheduler
from kataru.engine.speculate import Draft, Options, Proposal, Speculator
from kataru.errors import KataruError
from kataru.grammar import Grammars
from kataru.model import Transformer
from kataru.sampling import SamplingParams
from kataru.tokenizer import Tokenizer


def finite_rows(logits: torch.Tensor) -> list[bool]:
    """For each row of logits [..., V]: whether it is free of NaN and infinities. One float32 sum per row (an inf or
    NaN anywhere makes it non-finite; so would finite logits near float32's limit, as broken as an inf), where
    torch.isfinite over a batch of 100k-token vocabularies costs a millisecond per step in bf16."""
    totals = logits.reshape(-1, logits.shape[-1]).sum(-1, dtype=torch.float32)
    return [math.isfinite(total) for total in totals.tolist()]


DEFAULT_PREFILL_CHUNK = 128  # as fast as whole prompts on the CPU (bf16, int8) and reuse every 128 tokens


@dataclass
class Step:
    """One new token of a request; `finish_reason` is set on its last step."""

    request_id: int
    token_id: int
    finish_reason: str | None = None


def check_prompt(prompt: list[int], vocab: int, context: int) -> None:
    if not prompt:
        raise KataruError("the prompt is empty; give some text (or use the raw prompt style with special tokens)")
    if len(prompt) >= context:
        raise KataruError(f"the prompt is {len(prompt)} tokens, longer than the model's context of {context} "
                          "(the prompt and at least one new token must fit); shorten the prompt")
    for token in prompt:
        if isinstance(token, bool) or not isinstance(token, int) or not 0 <= token < vocab:
            raise KataruError(f"token id {token!r} is outside the vocabulary (0..{vocab - 1})")


class Engine:
    def __init__(self, model: Transformer, eos_ids: set[int], max_batch: int = 8,
                 max_cache_tokens: int | None = None, row_len: int | None = None, compile: bool = False,
                 prefix_reuse: bool = True, prefill_chunk: int | None = DEFAULT_PREFILL_CHUNK,
                 tokenizer: Tokenizer | None = None, postprocess: Callable[[str], str] = str,
                 grow: bool = False, idle_cache_tokens: int | None = None, batch_invariant: bool = False,
                 fuse: bool = True, speculation: Options | None = None, idle_after: float | None = None) -> None:
        """max_batch rows of row_len slots (default: the model's context); a request must fit in one row.

        max_cache_tokens: the budget of reserved tokens (default max_batch * row_len).
        prefill_chunk: prompt tokens per forward and per step at most (None: whole prompts, no reuse).
        tokenizer: keep each request's text as it streams and honour stop strings (postprocess: the prompt
            style's mapping of generated text, rinna's `<NL>`).
        grow: start with an empty cache and grow it as requests need (else allocate it all now);
            idle_cache_tokens: with grow, shrink to at most this many cache tokens when nothing runs: at once, or
            (idle_after, seconds) once nothing has run that long (a timer calls `release_idle`): a server's burst
            of requests then keeps its rows and prefixes, and a quiet server gives the memory back.
        batch_invariant: one matmul path for every decode batch size from now on in this process, so that a
            request decodes to the same bits alone or batched whatever the dispatch plan prefers.
        fuse: a step's last prompt chunk and its decode batch in one pass (the weights read once) where that
            gives both the bits of separate passes (`Runner.fuse`); False: always separately.
        speculation: speculative decoding (`speculate.Options`: the method requests use unless they say, the
            proposals per step at most, the n-gram lengths, a draft model); a request may ask for prompt lookup
            whatever the engine's method is.
        """
        self.model = model
        self.eos_ids = set(eos_ids)
        if batch_invariant:
            dispatch.batch_invariant(True)
        self.context = model.config.max_seq_len
        row_len = min(row_len or self.context, self.context)
        budget = max_cache_tokens or max_batch * row_len
        self.scheduler = Scheduler(self.context, max_batch, row_len, budget, prefill_chunk, prefix_reuse, grow,
                                   idle_cache_tokens)
        self.runner = Runner(model, compile, fuse)
        self.speculator = Speculator(model, speculation)
        self.fused_steps = 0  # steps whose last chunk went through with the decode batch
        self.idle_after = idle_after
        self._idle_since: float | None = None  # when the engine last ran out of work
        if not grow:
            self._resize(Resize(self.scheduler.rows, self.scheduler.slots, {}))
        self.tokenizer, self.postprocess = tokenizer, postprocess
        self.grammars: Grammars | None = None
        self.ids = itertools.count(1)
        self._lock = threading.Lock()  # held by a step
        self._inbox_lock = threading.Lock()  # held only to add or take requests and cancels
        self._inbox: list[Request] = []
        self._cancels: list[Request] = []
        self._worker: ThreadPoolExecutor | None = None
        self._loop_task: asyncio.Task | None = None

    # --- requests ------------------------------------------------------------------------------------
    def submit(self, prompt: list[int], params: SamplingParams) -> Request:
        """Queue a request (any thread); it starts at the next step. Refuses, in one line, a prompt or
        parameters that could not run."""
        check_prompt(prompt, self.model.config.vocab_size, self.context)
        params.validate()
        request = Request(list(prompt), params)
        self.speculator.check(request)
        if params.stop and self.tokenizer is None:
            raise KataruError("stop strings need text: build the engine with a tokenizer")
        if params.grammar is not None:
            self._grammars()  # the vocabulary is compiled once, and a broken grammar is refused now
        request.id = next(self.ids)
        request.times["submitted"] = time.monotonic()
        request.reserved = self.scheduler.reservation(len(prompt), params.max_new_tokens)
        with self._inbox_lock:
            self._inbox.append(request)
        return request

    def cancel(self, request: Request) -> None:
        """End a request now, or, while a step runs on another thread, as soon as that step ends (the step may
        be using its row, and the caller, an event loop, must not wait for it)."""
        if request.done:
            return
        with self._inbox_lock:
            self._cancels.append(request)
        if self._lock.acquire(blocking=False):
            try:
                self._apply_cancels()
            finally:
                self._lock.release()

    def attach_draft(self, draft: Draft) -> None:
        """Give the engine a draft model for speculation (its cache rows mirror the engine's from now on)."""
        with self._lock:
            self.speculator.options.draft = draft
            if self.scheduler.rows:
                draft.resize(Resize(self.scheduler.rows, self.scheduler.slots, {}))

    def _grammars(self) -> Grammars:
        if self.tokenizer is None:
            raise KataruError("a grammar needs the engine's tokenizer: build the engine with a tokenizer")
        if self.grammars is None:
            self.grammars = Grammars(self.tokenizer, self.eos_ids)
        return self.grammars

    def has_work(self) -> bool:
        return bool(self._inbox) or self.scheduler.has_work()

    def stats(self) -> dict[str, Any]:
        s, cache = self.scheduler, self.runner.cache
        return {"running": len(s.running), "prefilling": len(s.prefilling),
                "waiting": len(s.waiting) + len(self._inbox), "cache_rows": s.rows, "cache_slots": s.slots,
                "cache_bytes": cache.nbytes if cache else 0, "reserved_tokens": s.reserved,
                "budget_tokens": s.budget, "reused_tokens": s.reused_tokens, "fused_steps": self.fused_steps,
                **{f"spec_{name}": value for name, value in self.speculator.totals.items()}}

    # --- the step --------------------------------------------------------------------------------------
    def step(self) -> list[Step]:
        """Admit what fits, prefill up to `prefill_chunk` prompt tokens, then one decode step for every
        request that was running before (a request whose prompt completes here gets its first token from
        its prefill)."""
        with self._lock:
            return self._step()

    def release_idle(self) -> bool:
        """Shrink the cache to its idle size if nothing has run for `idle_after` seconds; True if it shrank."""
        with self._lock:
            if (self.idle_after is None or self._idle_since is None or self.has_work()
                    or time.monotonic() - self._idle_since < self.idle_after):
                return False
            resize = self.scheduler.idle_resize()
            if resize is not None:
                self._resize(resize)
            return resize is not None

    def run(self) -> None:
        """Step until every submitted request is done."""
        while self.has_work():
            self.step()

    def _step(self) -> list[Step]:
        try:
            self._take_inbox()
            self._apply_cancels()
            events = self._run(self.scheduler.schedule())
            self._apply_cancels()  # those asked for while the step ran
            if self.has_work():
                self._idle_since = None
            elif self.idle_after is None:
                resize = self.scheduler.idle_resize()
                if resize is not None:
                    self._resize(resize)
            elif self._idle_since is None:  # idle from now: the cache shrinks if it stays so (on a timer thread)
                self._idle_since = time.monotonic()
                timer = threading.Timer(self.idle_after, self.release_idle)
                timer.daemon = True
                timer.start()
            return events
        except Exception as err:  # outside any one request (a failed resize): end them all, clearly
            for request in [*self._take_all()]:
                self._fail(request, err)
            return []

    def _run(self, plan: Any) -> list[Step]:
        if plan.resize is not None:
            self._resize(plan.resize)
        events: list[Step] = []
        vocab, device = self.model.config.vocab_size, self.runner.device
        batch = [r for r in plan.decode if not r.done]
        proposals = self.speculator.propose(batch, self.context, self.scheduler.slots) if batch else []
        guesses = [p.tokens for p in proposals]
        decoded = None  # the batch's logits, once computed
        for i, chunk in enumerate(plan.prefill):
            request = chunk.request
            if request.sampling is None:
                request.times["admitted"] = time.monotonic()
                try:
                    outputs.start(request, vocab, device, self.tokenizer, self.postprocess,
                                  self.grammars if request.params.grammar else None)
                except Exception as err:
                    self._fail(request, err)
                    continue
            logits = None
            if batch and i == len(plan.prefill) - 1 and self.runner.fuse:
                try:
                    logits, decoded = self.runner.mixed(chunk, batch, guesses)
                    self.fused_steps += 1
                except Exception:  # each part again on its own, so that a failure ends only its own requests
                    logits = decoded = None
            if logits is None:
                try:
                    logits = self.runner.prefill(chunk)
                except Exception as err:
                    self._fail(request, err)
                    continue
            self.speculator.prefilled(request, chunk.end)
            if self.scheduler.prefilled(chunk):
                events.append(self._accept(request, logits, finite_rows(logits)[0]))
        if batch:
            start = time.perf_counter()
            try:
                if decoded is None:
                    with dispatch.pinned(len(batch)):  # every row computed as a plain step of this batch would
                        logits = self.runner.decode(batch, guesses)
                else:
                    logits = decoded
            except Exception as err:
                for request in batch:
                    self._fail(request, err)
                return events
            logits = logits.float()  # once for the batch, not once per row in `outputs.accept` (exact from bf16)
            finite = finite_rows(logits)
            if decoded is None:  # what a decode call of this many rows takes (speculation weighs its proposals by it)
                context = sum(r.length + len(g) for r, g in zip(batch, guesses, strict=True))
                self.speculator.observe(len(batch), len(finite), context, time.perf_counter() - start)
            at = 0
            for request, proposal in zip(batch, proposals, strict=True):
                rows = 1 + len(proposal.tokens)
                events += self._verify(request, logits[at:at + rows], finite[at:at + rows], proposal)
                at += rows
        return events

    def _verify(self, request: Request, logits: torch.Tensor, finite: list[bool], proposal: Proposal) -> list[Step]:
        """A request's rows of a decode step in order, each taken as a decode step of its own would take it, while
        the model's token equals the next proposal (one row and no proposal: a plain decode step)."""
        steps, kept, start = [], 0, request.length
        for i, row in enumerate(logits):
            guess = proposal.tokens[i] if i < len(proposal.tokens) else None
            drawn_from = proposal.probs[i] if proposal.probs and guess is not None else None
            step = self._accept(request, row, finite[i], guess, drawn_from)
            steps.append(step)
            hit = guess is not None and step.token_id == guess
            kept += hit
            if step.finish_reason is not None or not hit:
                break
        if proposal.tokens:
            self.speculator.verified(request, proposal, kept)
            if not all(finite) and request.row is not None:  # rows past the kept ones overflowed: clear their slots
                self.runner.clear(request.row, start + len(steps), start + len(logits))
        return steps

    def _accept(self, request: Request, logits: torch.Tensor, finite: bool, proposal: int | None = None,
                drawn_from: torch.Tensor | None = None) -> Step:
        if not finite:
            self._fail(request, "the model's logits for this request are NaN or infinite (overflow in the "
                                "weights' dtype?); try float32 or bfloat16", prefix=False)
            return Step(request.id, -1, "error")
        try:
            finish = outputs.accept(request, logits, self.eos_ids, self.context, proposal, drawn_from)
        except Exception as err:
            self._fail(request, err)
            return Step(request.id, -1, "error")
        if len(request.tokens) == 1:
            request.times["first_token"] = time.monotonic()
        if finish is not None:
            self._finish(request, finish)
        elif request.wake is not None:
            request.wake()
        return Step(request.id, request.tokens[-1], finish)

    def _resize(self, resize: Resize) -> None:
        self.runner.resize(resize)
        self.speculator.resize(resize)
        self.scheduler.applied(resize)

    def _finish(self, request: Request, finish: str) -> None:
        request.times["finished"] = time.monotonic()
        self.scheduler.finish(request, finish)
        if request.on_finish is not None:
            request.on_finish(request)
        if request.wake is not None:
            request.wake()

    def _fail(self, request: Request, err: BaseException | str, prefix: bool = True) -> None:
        text = err if isinstance(err, str) else reason(err)
        request.error = f"the engine failed ({text})" if prefix else text
        self._finish(request, "error")

    def _take_inbox(self) -> None:
        with self._inbox_lock:
            new, self._inbox = self._inbox, []
        for request in new:
            self.scheduler.waiting.append(request)

    def _take_all(self) -> list[Request]:
        self._take_inbox()
        s = self.scheduler
        return [*s.waiting, *s.prefilling, *s.running]

    def _apply_cancels(self) -> None:
        with self._inbox_lock:
            cancels, self._cancels = self._cancels, []
            for request in cancels:
                if request in self._inbox:
                    self._inbox.remove(request)
        for request in cancels:
            if not request.done:
                self._finish(request, "cancelled")

    # --- waiting for results ---------------------------------------------------------------------------
    def _drive(self, ready: Callable[[], bool]) -> None:
        """Step, or wait for the step another thread runs, until `ready()` holds."""
        while not ready():
            with self._lock:
                if ready() or not self.has_work():
                    return
                self._step()

    def wait(self, request: Request) -> Request:
        """Step until the request is done (from any thread; other requests progress on the way)."""
        self._drive(lambda: request.done)
        return request

    def follow(self, request: Request) -> Iterator[Request]:
        """The request each time it has new tokens, until it is done; cancelled if the consumer stops."""
        seen = 0

        def ready() -> bool:
            return request.done or len(request.tokens) > seen

        try:
            while True:
                self._drive(ready)
                seen = len(request.tokens)
                yield request
                if request.done and seen == len(request.tokens):  # done, and the consumer saw its last token
                    return
        finally:
            if not request.done:
                self.cancel(request)

    async def watch(self, requests: list[Request]) -> AsyncIterator[None]:
        """Yields at once, then each time one of the requests has new tokens or ends, until all have ended.
        Steps run on the engine's worker thread, so the event loop (a server's) stays free while one
        computes; a consumer that leaves early (a client gone) cancels the requests not yet finished."""
        loop = asyncio.get_running_loop()
        ready = asyncio.Event()
        for request in requests:
            request.wake = lambda: loop.call_soon_threadsafe(ready.set)
        self._start_background(loop)
        try:
            while True:
                ready.clear()
                yield
                if all(r.done for r in requests):
                    return
                await ready.wait()
        finally:
            for request in requests:
                request.wake = None
                if not request.done:
                    self.cancel(request)

    async def stream(self, request: Request) -> AsyncIterator[int]:
        """Token ids of one request as they come (see `watch`); raises the request's error if it failed."""
        sent = 0
        async with aclosing(self.watch([request])) as updates:  # a consumer gone cancels the request at once
            async for _ in updates:
                while sent < len(request.tokens):
                    yield request.tokens[sent]
                    sent += 1
        if request.finish_reason == "error":
            raise KataruError(request.error or "the engine failed")

    async def run_in_worker(self, fn: Callable[[], Any]) -> Any:
        """fn() on the engine's worker thread, between steps (work that should not run beside a step)."""
        return await asyncio.get_running_loop().run_in_executor(self._executor(), fn)

    def _executor(self) -> ThreadPoolExecutor:
        if self._worker is None:
            self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="kataru-engine")
        return self._worker

    def _start_background(self, loop: asyncio.AbstractEventLoop) -> None:
        if self._loop_task is None or self._loop_task.done():
            self._loop_task = loop.create_task(self._background())

    async def _background(self) -> None:
        loop = asyncio.get_running_loop()
        while self.has_work():
            await loop.run_in_executor(self._executor(), self.step)
