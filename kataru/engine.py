"""Continuous batching: requests join the running batch at step boundaries and leave when done.

Each running request owns one row of the preallocated KV cache; rows hold sequences of any length, so a
decode step writes each row's token at that row's own slot and masks every row to its own keys. A new
request is prefilled alone into a free row, then decodes with the others. Long prompts are prefilled in
chunks, at most `prefill_chunk` prompt tokens a step, with a decode step for the running requests after
each: a long prompt delays their next token by one chunk's time, not the whole prompt's. A prompt's
chunk boundaries depend only on the prompt (and the prefix it reuses), never on its neighbours.

Memory is a budget of cache tokens: a request reserves its prompt plus max_new_tokens (capped at the
context) and waits while the budget or the rows are taken; one that could never fit is refused at
submission. Cancelling frees the row and the reservation at once. Greedy results equal running each
request alone.

`async for token in engine.stream(request)` runs the steps on one worker thread, so an event loop (the
server's) stays free while a step computes; a cancel asked for during a step takes effect when it ends,
and a step that fails ends every request's stream with one error instead of leaving them waiting.

Prefix reuse: a free row keeps the keys and values of the request that last used it, so a new request
whose prompt starts with those tokens (the next turn of a chat, a shared system prompt) takes that row
and prefills only the rest.

With compile=True the one-token decode step runs through `torch.compile` (the key length is dynamic,
so it compiles once for batch 1 and once for larger batches per KV-cache shape, not per length), with
kataru's CPU kernels inside the graph as torch operators; when the compiler is unavailable or fails, the
engine says so once on stderr and keeps decoding eagerly. On a GPU the eager step is replayed from CUDA
graphs (`GraphedDecode`).
"""

from __future__ import annotations

import asyncio
import itertools
import sys
import threading
from collections import deque
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import torch

from kataru import kernels
from kataru.errors import KataruError
from kataru.generation import SamplingParams, Step, check_context, pick_token, sampling_generator, seen_tokens
from kataru.model import Transformer


@dataclass
class Request:
    prompt: list[int]
    params: SamplingParams
    id: int = 0
    row: int | None = None
    tokens: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    reserved: int = 0
    prefilled: int = 0  # prompt tokens whose keys and values are in the cache
    generator: torch.Generator | None = None
    seen: torch.Tensor | None = None
    wake: Callable[[], None] | None = None  # tells a `stream` that a token or the end came (from any thread)

    @property
    def done(self) -> bool:
        return self.finish_reason is not None

    @property
    def length(self) -> int:
        """Tokens in the cache: the prompt (as far as prefilled) and every generated token but the newest."""
        return self.prefilled + max(len(self.tokens) - 1, 0)


class Engine:
    def __init__(self, model: Transformer, eos_ids: set[int], max_batch: int = 8,
                 max_cache_tokens: int | None = None, row_len: int | None = None, compile: bool = False,
                 decode: Callable[..., torch.Tensor] | None = None, prefix_reuse: bool = True,
                 prefill_chunk: int | None = 512) -> None:
        """row_len: cache slots per row (default the model's context); a request must fit in one row.

        decode: the one-token step to use (e.g. a `compiled_decode(model)` kept across engines).
        prefill_chunk: prompt tokens prefilled per step at most (None: every admitted prompt whole in one step).
        """
        if prefill_chunk is not None and prefill_chunk < 1:
            raise KataruError(f"prefill_chunk must be a positive number of tokens (or None), got {prefill_chunk}")
        self.model = model
        self.eos_ids = eos_ids
        self.max_batch = max_batch
        self.context = model.config.max_seq_len
        self.row_len = min(row_len or self.context, self.context)
        self.max_cache_tokens = max_cache_tokens
        self.budget = max_cache_tokens or max_batch * self.row_len
        model.setup_caches(max_batch, self.row_len)
        self.free_rows = list(range(max_batch))
        self.prefix_reuse = prefix_reuse
        self.prefill_chunk = prefill_chunk
        self.cached: dict[int, list[int]] = {}  # free row -> the tokens whose keys/values it still holds
        self.reused_tokens = 0
        self.waiting: deque[Request] = deque()
        self.prefilling: deque[Request] = deque()  # admitted (row and memory taken), prompt not all in the cache
        self.running: list[Request] = []
        self.reserved = 0
        self.ids = itertools.count(1)
        self._loop_task: asyncio.Task | None = None
        self._lock = threading.Lock()  # held by a step; the asyncio side runs steps on one worker thread
        self._worker: ThreadPoolExecutor | None = None
        self._cancels: list[Request] = []  # asked for while a step ran in the worker
        self.failure: BaseException | None = None
        self.decode_fn: Callable[..., torch.Tensor] = decode or (compiled_decode(model) if compile
                                                                 else eager_decode(model))

    def grow(self, max_batch: int, row_len: int) -> None:
        """More rows or longer ones, keeping the prefixes free rows hold (an idle engine only)."""
        if self.has_work():
            raise KataruError("an engine can only grow while no request is running or waiting")
        max_batch, row_len = max(max_batch, self.max_batch), min(max(row_len, self.row_len), self.context)
        self.model.setup_caches(max_batch, row_len, keep=True)
        self.free_rows = sorted(set(self.free_rows) | set(range(self.max_batch, max_batch)))
        self.max_batch, self.row_len = max_batch, row_len
        self.budget = self.max_cache_tokens or max_batch * row_len

    # --- requests ----------------------------------------------------------------------------------
    def submit(self, prompt: list[int], params: SamplingParams) -> Request:
        check_context(len(prompt), self.context)
        params.validate()
        request = Request(list(prompt), params, id=next(self.ids))
        request.reserved = min(len(prompt) + params.max_new_tokens, self.context)
        if request.reserved > self.row_len:
            raise KataruError(f"the request needs {request.reserved} cache slots, more than the engine's rows of "
                              f"{self.row_len}; lower max_new_tokens or build the engine with a longer row_len")
        if request.reserved > self.budget:
            raise KataruError(f"the request needs {request.reserved} cache tokens, more than the engine's budget of "
                              f"{self.budget}; lower max_new_tokens or raise max_cache_tokens")
        self.waiting.append(request)
        return request

    def cancel(self, request: Request) -> None:
        """Free the request's row and memory now, or, while a step runs on another thread (`stream`), as soon
        as that step ends: the step may be using them, and the caller (an event loop) must not wait for it."""
        if request.done:
            return
        self._cancels.append(request)
        if self._lock.acquire(blocking=False):
            try:
                self._apply_cancels()
            finally:
                self._lock.release()

    def _apply_cancels(self) -> None:
        while self._cancels:
            request = self._cancels.pop()
            if request.done:
                continue
            if request in self.waiting:
                self.waiting.remove(request)
            self._finish(request, "cancelled")

    @property
    def free_tokens(self) -> int:
        return self.budget - self.reserved

    def has_work(self) -> bool:
        return bool(self.waiting or self.prefilling or self.running)

    # --- the step ----------------------------------------------------------------------------------
    def step(self) -> list[Step]:
        """Admit what fits, prefill up to `prefill_chunk` prompt tokens, then one decode step for every request
        that was running before (a request whose prefill ends here gets its first token from the prefill)."""
        with self._lock:
            events = self._step()
            self._apply_cancels()  # those asked for while the step ran
        return events

    @torch.inference_mode()
    def _step(self) -> list[Step]:
        running_before = list(self.running)
        while self.waiting and self.free_rows and self.waiting[0].reserved <= self.free_tokens:
            self._admit(self.waiting.popleft())
        events = self._prefill()
        if running_before:
            events += self._decode([r for r in running_before if not r.done])
        return events

    def _pick_row(self, prompt: list[int]) -> tuple[int, int]:
        """(free row, tokens of the prompt already in it): the longest cached prefix, else an empty row."""
        if getattr(self.model, "cache_owner", None) is not self:  # someone else wrote the cache since
            self.cached.clear()
            self.model.cache_owner = self
        best, reuse = None, 0
        if self.prefix_reuse:
            for row in self.free_rows:
                held = self.cached.get(row, [])
                n = 0
                limit = min(len(held), len(prompt) - 1)  # at least one prompt token is prefilled, for its logits
                while n < limit and held[n] == prompt[n]:
                    n += 1
                if n > reuse:
                    best, reuse = row, n
        if best is None:
            empty = [r for r in self.free_rows if r not in self.cached]
            best = empty[0] if empty else self.free_rows[0]
        self.free_rows.remove(best)
        self.cached.pop(best, None)
        return best, reuse

    def _admit(self, request: Request) -> None:
        request.row, request.prefilled = self._pick_row(request.prompt)
        self.reused_tokens += request.prefilled
        self.reserved += request.reserved
        device = self.model.tok_embeddings.weight.device
        request.seen = seen_tokens(request.prompt, self.model.config.vocab_size, device)
        request.generator = sampling_generator(request.params, device)
        self.prefilling.append(request)

    def _prefill(self) -> list[Step]:
        """The next chunk of each prefilling request in turn while the step's chunk budget lasts (the first
        always goes); a request whose prompt is all in the cache samples its first token and runs."""
        events: list[Step] = []
        device = self.model.tok_embeddings.weight.device
        budget = self.prefill_chunk or sys.maxsize
        spent = 0
        while self.prefilling:
            request = self.prefilling[0]
            n = min(len(request.prompt) - request.prefilled, budget)
            if spent and spent + n > budget:
                break
            tokens = torch.tensor([request.prompt[request.prefilled:request.prefilled + n]], device=device)
            logits = self.model(tokens, start=request.prefilled, rows=torch.tensor([request.row], device=device),
                                last_only=True)
            request.prefilled += n
            spent += n
            if request.prefilled == len(request.prompt):
                self.prefilling.popleft()
                self.running.append(request)
                events.append(self._accept(request, logits[0, -1]))
        return events

    def _decode(self, batch: list[Request]) -> list[Step]:
        if not batch:
            return []
        device = self.model.tok_embeddings.weight.device
        tokens = torch.tensor([[r.tokens[-1]] for r in batch], device=device)
        lengths = [r.length for r in batch]
        slots = torch.tensor(lengths, device=device)
        rows = torch.tensor([r.row for r in batch], device=device)
        logits = self.decode_fn(tokens, start=slots, rows=rows, span=max(lengths) + 1)
        return [self._accept(r, logits[i, -1]) for i, r in enumerate(batch)]

    def _accept(self, request: Request, logits: torch.Tensor) -> Step:
        assert request.seen is not None
        token = pick_token(logits, request.seen, request.params, request.generator)
        if token < request.seen.numel():
            request.seen[token] = True
        request.tokens.append(token)
        reason = None
        if token in self.eos_ids and not request.params.ignore_eos:
            reason = "stop"
        elif len(request.tokens) >= request.params.max_new_tokens or request.length + 1 >= self.context:
            reason = "length"
        if reason:
            self._finish(request, reason)  # which wakes the stream
        elif request.wake is not None:
            request.wake()
        return Step(request.id, token, reason)

    def _finish(self, request: Request, reason: str) -> None:
        request.finish_reason = reason
        if request in self.running or request in self.prefilling:
            (self.running if request in self.running else self.prefilling).remove(request)
            self.reserved -= request.reserved
            assert request.row is not None
            self.free_rows.append(request.row)
            self.cached[request.row] = (request.prompt + request.tokens)[:request.length]
            self.free_rows.sort()
        if request.wake is not None:
            request.wake()

    def run(self) -> None:
        """Step until every submitted request is done."""
        while self.has_work():
            self.step()

    # --- async ---------------------------------------------------------------------------------------
    async def stream(self, request: Request) -> AsyncIterator[int]:
        """Token ids of one request as they come. The engine steps on a worker thread, so the event loop
        (a server's) stays free while a step computes; tokens are read from `request.tokens` as the step
        appends them, and `request.wake` tells this loop that there are more."""
        loop = asyncio.get_running_loop()
        ready = asyncio.Event()
        request.wake = lambda: loop.call_soon_threadsafe(ready.set)
        if self._loop_task is None or self._loop_task.done():
            self._loop_task = loop.create_task(self._background())
        sent = 0
        try:
            while True:
                ready.clear()
                while sent < len(request.tokens):
                    yield request.tokens[sent]
                    sent += 1
                if request.done and sent == len(request.tokens):  # a request is done after its last token
                    break
                if sent == len(request.tokens):
                    await ready.wait()
        finally:
            request.wake = None
            if not request.done:  # the consumer went away: free the row
                self.cancel(request)
        if request.finish_reason == "error":
            raise KataruError(f"the engine failed ({_reason(self.failure)})") from self.failure

    async def _background(self) -> None:
        loop = asyncio.get_running_loop()
        if self._worker is None:
            self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="kataru-engine")
        while self.has_work():
            try:
                await loop.run_in_executor(self._worker, self.step)
            except Exception as err:  # end every request rather than leave their streams waiting forever
                self.failure = err
                with self._lock:
                    for request in [*self.waiting, *self.prefilling, *self.running]:
                        self._finish(request, "error")
                    self.waiting.clear()
                return


def compiled_decode(model: Transformer) -> Callable[..., torch.Tensor]:
    """model's forward for one-token steps through torch.compile, falling back to eager on any failure."""
    kernels.library()  # built and loaded now: a compiled graph calls the kernels as torch operators
    try:
        compiled = torch.compile(model, dynamic=True)
    except Exception as err:  # torch built without dynamo, unsupported Python, ...
        print(f"kataru: torch.compile is unavailable ({type(err).__name__}: {str(err)[:120]}); decoding eagerly",
              file=sys.stderr)
        return model
    state = {"fn": compiled}

    def decode(*args, **kwargs) -> torch.Tensor:  # type: ignore[no-untyped-def]
        try:
            return state["fn"](*args, **kwargs)
        except Exception as err:
            if state["fn"] is model:
                raise
            print(f"kataru: torch.compile failed ({_reason(err)}); decoding eagerly", file=sys.stderr)
            state["fn"] = model
            return model(*args, **kwargs)

    return decode


def _reason(err: BaseException) -> str:
    """The error's type and the first line of its message: one line on stderr, not a compiler's trace."""
    text = str(err).strip()
    return f"{type(err).__name__}: {text.splitlines()[0][:160] if text else ''}"


def eager_decode(model: Transformer) -> Callable[..., torch.Tensor]:
    """The one-token step without the compiler: the model itself on the CPU, CUDA graphs of it on a GPU."""
    return GraphedDecode(model) if model.tok_embeddings.weight.device.type == "cuda" else model


class GraphedDecode:
    """The one-token step at static shapes, replayed from CUDA graphs on a GPU.

    A decode step launches hundreds of small kernels, each costing more to launch than to run at one token;
    a CUDA graph launches them all at once. A graph fixes every shape, so the batch is padded to a bucket
    (1, 2, 4, ... up to the cache's rows) by repeating its last row (the same key and value written to the
    same slot again, its logits dropped), and the rows attend over a span bucket (64, 128, 256, ... slots
    up to the cache's row length) under the row mask rather than over the longest row's exact span: the
    attention gathers each row's keys and values up to the span, so a short row should not pay for the
    whole cache row. One graph per (batch, span) bucket is captured on first use, after warm-up runs on a
    side stream, and replayed with each step's inputs copied into its static buffers; a new KV cache (the
    engine grew) drops them. With capture=False (the default off CUDA) the same static step runs eagerly,
    which is what the CPU tests check. If capture fails, one line on stderr says so and decoding goes on
    eagerly at the batch's own shapes (padding only pays for itself in a graph).
    """

    min_span = 64

    def __init__(self, model: Transformer, capture: bool | None = None) -> None:
        self.model = model
        self.capture = model.tok_embeddings.weight.device.type == "cuda" if capture is None else capture
        self.graphs: dict[tuple[int, int], tuple[list[torch.Tensor], torch.Tensor, torch.cuda.CUDAGraph]] = {}
        self.cache_id: tuple[int, int, int] | None = None
        self.pool: Any = None
        self.failed = False

    def __call__(self, tokens: torch.Tensor, start: torch.Tensor, rows: torch.Tensor,
                 span: int | None = None) -> torch.Tensor:
        model, b = self.model, tokens.shape[0]
        if self.failed:
            return model(tokens, start=start, rows=rows, span=span)
        bucket = 1 << (b - 1).bit_length()
        if bucket <= model.cache_rows and bucket > b:
            inputs = [torch.cat((t, t[-1:].expand(bucket - b, *t.shape[1:]))) for t in (tokens, start, rows)]
        else:
            inputs = [tokens, start, rows]
        wanted = model.cache_len if span is None else span
        span_bucket = min(max(self.min_span, 1 << (wanted - 1).bit_length()), model.cache_len)
        if not self.capture:
            return model(inputs[0], start=inputs[1], rows=inputs[2], span=span_bucket)[:b]
        cache = model.layers[0].attention.kv_cache
        assert cache is not None, "setup_caches() before decoding"
        cache_id = (cache.k.data_ptr(), model.cache_rows, model.cache_len)
        if cache_id != self.cache_id:
            self.graphs.clear()
            self.cache_id = cache_id
        try:
            static, out, graph = self.graphs.get((len(inputs[0]), span_bucket)) or self._capture(inputs, span_bucket)
        except Exception as err:  # no CUDA, an op that cannot be captured, ...
            print(f"kataru: CUDA graph capture failed ({_reason(err)}); decoding eagerly", file=sys.stderr)
            self.capture, self.failed = False, True
            return model(tokens, start=start, rows=rows, span=span)
        for buffer, value in zip(static, inputs, strict=True):
            buffer.copy_(value)
        with torch.cuda.device(out.device):  # see _capture
            graph.replay()
        return out[:b].clone()  # the graph's output buffer is overwritten by the next replay

    def _capture(self, inputs: list[torch.Tensor], span: int) -> tuple[list[torch.Tensor], torch.Tensor,
                                                                       torch.cuda.CUDAGraph]:
        # Streams and graphs belong to the current device, which is per thread (the engine's worker thread
        # starts on device 0): make it the model's.
        with torch.cuda.device(inputs[0].device):
            return self._capture_on_device(inputs, span)

    def _capture_on_device(self, inputs: list[torch.Tensor], span: int) -> tuple[list[torch.Tensor], torch.Tensor,
                                                                                    torch.cuda.CUDAGraph]:
        model = self.model
        static = [t.clone() for t in inputs]

        def step() -> torch.Tensor:
            return model(static[0], start=static[1], rows=static[2], span=span)

        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up: lazy initialisation and allocations happen outside the graph
            for _ in range(2):
                step()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            out = step()
        self.pool = graph.pool()
        self.graphs[(len(static[0]), span)] = (static, out, graph)
        return static, out, graph
