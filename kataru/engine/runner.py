"""Runs the model for the scheduler on the KV cache the engine owns: one prompt chunk, one decode batch, or
both in one pass (`mixed`: the weights read once for the chunk and the decode rows).

The one-token decode step comes in three kinds, all `step(tokens, cache, rows, slots, span) -> logits`:
- eager: `Transformer.decode` itself (the CPU default);
- compiled: `Transformer.decode` through `torch.compile` with dynamic shapes, kataru's CPU kernels inside
  the graph as torch operators; when the compiler is missing or fails, one line on stderr and eager
  decoding from then on;
- graphed: on a GPU, the step replayed from CUDA graphs (`GraphedDecode`).
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from kataru import dispatch, kernels
from kataru.engine.scheduler import Chunk, Request, Resize
from kataru.model import KVCache, Transformer

DecodeStep = Callable[[Tensor, KVCache, Tensor, Tensor, int], Tensor]


class Runner:
    def __init__(self, model: Transformer, compile: bool = False, fuse: bool = True) -> None:
        self.model = model
        self.device = model.tok_embeddings.weight.device
        self.cache: KVCache | None = None
        self.decode_step: DecodeStep = make_decode_step(model, compile)
        # a chunk and a decode batch in one pass where that gives each its own bits: eager CPU decoding (a
        # compiled or graphed step computes otherwise) and matmuls that treat every row alike
        self._fuse: bool | None = None if fuse and not compile and self.device.type == "cpu" else False

    @property
    def fuse(self) -> bool:
        """Whether `mixed` gives the bits of `prefill` and `decode` (decided once the plans exist: first asked)."""
        if self._fuse is None:
            self._fuse = dispatch.row_invariant(self.model)
        return self._fuse

    def resize(self, resize: Resize) -> None:
        """Give the cache its new shape, keeping the rows the scheduler moves (CUDA graphs, which hold the
        old cache's addresses, are dropped)."""
        if resize.rows == 0:
            self.cache = None
        elif self.cache is None:
            self.cache = self.model.new_cache(resize.rows, resize.slots)
        else:
            self.cache = self.cache.resized(self.model.config, resize.rows, resize.slots, resize.moves)
        reset = getattr(self.decode_step, "reset", None)
        if reset is not None:
            reset()

    @torch.inference_mode()
    def prefill(self, chunk: Chunk) -> Tensor:
        """Logits [V] after the chunk's last token."""
        tokens, cache, row = self._chunk_inputs(chunk)
        return self.model.prefill(tokens, cache, row, chunk.start)[0]

    @torch.inference_mode()
    def decode(self, batch: list[Request], proposals: list[list[int]] | None = None) -> Tensor:
        """Logits [rows, V]: one step for every request of the batch, each at its own slot of its own row; a
        request with proposals (speculation) takes one more row per proposal, at the next slots of its row."""
        return self.decode_step(*self._decode_inputs(batch, proposals))

    @torch.inference_mode()
    def mixed(self, chunk: Chunk, batch: list[Request],
              proposals: list[list[int]] | None = None) -> tuple[Tensor, Tensor]:
        """`prefill(chunk)` and `decode(batch, proposals)` in one pass (the caller checks `fuse`)."""
        tokens, _, row = self._chunk_inputs(chunk)
        last, decoded = self.model.mixed(tokens, row, chunk.start, *self._decode_inputs(batch, proposals))
        return last[0], decoded

    @torch.inference_mode()
    def clear(self, row: int, start: int, end: int) -> None:
        """Zero slots [start, end) of a cache row (rejected proposals whose keys overflowed: a masked slot must
        not hold NaN, which a zero attention weight still spreads)."""
        assert self.cache is not None
        for tensor in (*self.cache.k, *self.cache.v):
            tensor[row, :, start:end] = 0

    def _chunk_inputs(self, chunk: Chunk) -> tuple[Tensor, KVCache, int]:
        assert self.cache is not None and chunk.request.row is not None
        return (torch.tensor([chunk.request.prompt[chunk.start:chunk.end]], device=self.device), self.cache,
                chunk.request.row)

    def _decode_inputs(self, batch: list[Request],
                       proposals: list[list[int]] | None = None) -> tuple[Tensor, KVCache, Tensor, Tensor, int]:
        assert self.cache is not None
        if not proposals or not any(proposals):
            tokens = torch.tensor([[r.tokens[-1]] for r in batch], device=self.device)
            lengths = [r.length for r in batch]
            slots = torch.tensor(lengths, device=self.device)
            rows = torch.tensor([r.row for r in batch], device=self.device)
            return tokens, self.cache, rows, slots, max(lengths) + 1
        ids, where, at = [], [], []
        for r, extra in zip(batch, proposals, strict=True):
            for j, token in enumerate([r.tokens[-1], *extra]):
                ids.append([token])
                where.append(r.row)
                at.append(r.length + j)
        return (torch.tensor(ids, device=self.device), self.cache, torch.tensor(where, device=self.device),
                torch.tensor(at, device=self.device), max(at) + 1)


def make_decode_step(model: Transformer, compile: bool = False) -> DecodeStep:
    if compile:
        return compiled_decode(model)
    return GraphedDecode(model) if model.tok_embeddings.weight.device.type == "cuda" else model.decode


def compiled_decode(model: Transformer) -> DecodeStep:
    """model.decode through torch.compile (dynamo keeps its graphs with the code, so engines on one model
    share them); falls back to eager decoding, with one line on stderr, when the compiler is unavailable or
    fails."""
    for isa in kernels.ISAS:  # every build loaded now: a compiled graph calls the kernels as torch operators
        kernels.library(isa)
    try:
        compiled = torch.compile(model.decode, dynamic=True)
    except Exception as err:  # torch built without dynamo, an unsupported Python, ...
        print(f"kataru: torch.compile is unavailable ({reason(err)}); decoding eagerly", file=sys.stderr)
        return model.decode
    state: dict[str, Any] = {"fn": compiled}

    def decode(tokens: Tensor, cache: KVCache, rows: Tensor, slots: Tensor, span: int) -> Tensor:
        try:
            return state["fn"](tokens, cache, rows, slots, span)
        except Exception as err:
            if state["fn"] is model.decode or not _from_compiler(err):
                raise
            print(f"kataru: torch.compile failed ({reason(err)}); decoding eagerly", file=sys.stderr)
            state["fn"] = model.decode
            return model.decode(tokens, cache, rows, slots, span)

    return decode


def _from_compiler(err: BaseException) -> bool:
    """Whether an error came from the compiler (dynamo, inductor, a missing C++ toolchain) rather than from
    the model: only those fall back to eager, a genuine error is raised as it is."""
    module = type(err).__module__ or ""
    return module.startswith("torch._") or "Inductor" in type(err).__name__ or "compile" in str(err).lower()


def reason(err: BaseException) -> str:
    """The error's type and the first line of its message: one line on stderr, not a compiler's trace."""
    text = str(err).strip()
    return f"{type(err).__name__}: {text.splitlines()[0][:160] if text else ''}"


class GraphedDecode:
    """The one-token step at static shapes, replayed from CUDA graphs on a GPU.

    A decode step launches hundreds of small kernels, each costing more to launch than to run at one token;
    a CUDA graph launches them all at once. A graph fixes every shape, so the batch is padded to a bucket
    (1, 2, 4, ... up to the cache's rows) by repeating its last row (the same key and value written to the
    same slot again, its logits dropped), and the rows attend over a span bucket (64, 128, 256, ... slots
    up to the cache's row length) under the row mask rather than over the longest row's exact span: the
    attention gathers each row's keys and values up to the span, so a short row should not pay for the
    whole cache row. One graph per (batch, span) bucket is captured on first use, after warm-up runs on a
    side stream, and replayed with each step's inputs copied into its static buffers; `reset` (the engine
    gave the cache a new shape) drops them. With capture=False (the default off CUDA) the same static step
    runs eagerly, which is what the CPU tests check. If capture fails, one line on stderr says so and
    decoding goes on eagerly at the batch's own shapes (padding only pays for itself in a graph).
    """

    min_span = 64

    def __init__(self, model: Transformer, capture: bool | None = None) -> None:
        self.model = model
        self.capture = model.tok_embeddings.weight.device.type == "cuda" if capture is None else capture
        self.graphs: dict[tuple[int, int], tuple[list[Tensor], Tensor, torch.cuda.CUDAGraph]] = {}
        self.pool: Any = None
        self.failed = False

    def reset(self) -> None:
        self.graphs.clear()

    def __call__(self, tokens: Tensor, cache: KVCache, rows: Tensor, slots: Tensor, span: int) -> Tensor:
        model, b = self.model, tokens.shape[0]
        if self.failed:
            return model.decode(tokens, cache, rows, slots, span)
        bucket = 1 << (b - 1).bit_length()
        inputs = [tokens, rows, slots]
        if b < bucket <= cache.rows:
            inputs = [torch.cat((t, t[-1:].expand(bucket - b, *t.shape[1:]))) for t in inputs]
        span_bucket = min(max(self.min_span, 1 << (span - 1).bit_length()), cache.slots)
        if not self.capture:
            return model.decode(inputs[0], cache, inputs[1], inputs[2], span_bucket)[:b]
        try:
            static, out, graph = self.graphs.get((len(inputs[0]), span_bucket)) or self._capture(inputs, cache,
                                                                                                span_bucket)
        except Exception as err:  # no CUDA, an op that cannot be captured, ...
            print(f"kataru: CUDA graph capture failed ({reason(err)}); decoding eagerly", file=sys.stderr)
            self.capture, self.failed = False, True
            return model.decode(tokens, cache, rows, slots, span)
        for buffer, value in zip(static, inputs, strict=True):
            buffer.copy_(value)
        with torch.cuda.device(out.device):  # see _capture
            graph.replay()
        return out[:b].clone()  # the graph's output buffer is overwritten by the next replay

    def _capture(self, inputs: list[Tensor], cache: KVCache, span: int) -> tuple[list[Tensor], Tensor,
                                                                                 torch.cuda.CUDAGraph]:
        # Streams and graphs belong to the current device, which is per thread (the engine may step on a
        # worker thread, which starts on device 0): make it the model's.
        with torch.cuda.device(inputs[0].device):
            static = [t.clone() for t in inputs]

            def step() -> Tensor:
                return self.model.decode(static[0], cache, static[1], static[2], span)

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
