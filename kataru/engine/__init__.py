"""Continuous batching, split as vLLM v1 splits it.

    scheduler.py  which requests run in a step and where: rows, the token budget, chunks, prefix reuse
    runner.py     the model on the engine's KV cache: a prompt chunk, a decode batch (eager, compiled, graphed)
    outputs.py    a request's next token, its streamed text, and the one rule for when it is finished
    core.py       Engine: submit / cancel / step, and waiting for results from threads, generators or asyncio
"""

from kataru.engine.core import DEFAULT_PREFILL_CHUNK, Engine, Step
from kataru.engine.runner import GraphedDecode, compiled_decode
from kataru.engine.scheduler import Request

__all__ = ["DEFAULT_PREFILL_CHUNK", "Engine", "GraphedDecode", "Request", "Step", "compiled_decode"]
