"""Where a decode step's time goes: the engine steps a batch on a seed shape while every call into kataru's C
kernels is timed by kind and, for matmuls, by weight shape (ms per step and GFLOP/s per call); the rest is
Python, torch's small ops and sampling.

usage: .venv/bin/python bench/step_breakdown.py [--shape llm-jp-3.1-1.8b] [--layers N] [--quantize int8|int4]
                                                [--batch 8] [--prompt 32] [--steps 10]
The plan is measured or read as `kataru.load` does (KATARU_DISPATCH), so bf16 weights take the packed layout
where the plan says so.
"""

from __future__ import annotations

import argparse
import collections
import time
from collections.abc import Callable
from typing import Any

from common import decoding, shape_arguments, shape_engine, shape_model

from kataru import dispatch, kernels

TIMED = ("_linear_packed", "_linear_half", "_linear_int8", "_linear_int4", "_decode_attention", "_rms_norm")


def timed(name: str, seconds: dict[str, float], calls: collections.Counter, flops: dict[str, float]) -> Callable:
    kernel = getattr(kernels, name)

    def call(*args: Any) -> Any:
        start = time.perf_counter()
        out = kernel(*args)
        spent = time.perf_counter() - start
        key = name.removeprefix("_")
        if name.startswith("_linear"):
            rows, k = args[0].numel() // args[0].shape[-1], args[0].shape[-1]
            key = f"{key} {out.shape[-1]}x{k}"
            flops[key] += 2 * rows * k * out.shape[-1]
        seconds[key] += spent
        calls[key] += 1
        return out

    return call


def main() -> None:
    parser = argparse.ArgumentParser()
    shape_arguments(parser)
    parser.add_argument("--steps", type=int, default=10, help="decode steps timed")
    parser.set_defaults(batch=8)
    args = parser.parse_args()
    if not kernels.available():
        raise SystemExit("kataru's CPU kernels are unavailable here (no C compiler, no AVX2, or KATARU_KERNELS=0)")
    model = shape_model(args.shape, args.layers, args.quantize)
    dispatch.prepare(model)
    engine = decoding(shape_engine(model, args.batch, 2 * args.steps + 16, prompt=args.prompt), args.batch)
    engine.step()
    seconds: dict[str, float] = collections.defaultdict(float)
    flops: dict[str, float] = collections.defaultdict(float)
    calls: collections.Counter = collections.Counter()
    for name in TIMED:
        setattr(kernels, name, timed(name, seconds, calls, flops))
    start = time.perf_counter()
    for _ in range(args.steps):
        engine.step()
    step = (time.perf_counter() - start) / args.steps
    print(f"{args.shape} {args.quantize or 'bf16'}, batch {args.batch}: {step * 1e3:.1f} ms per decode step")
    for key, spent in sorted(seconds.items(), key=lambda item: -item[1]):
        rate = f"{flops[key] / spent / 1e9:6.1f} GFLOP/s" if flops[key] else ""
        print(f"  {key:34} {spent / args.steps * 1e3:7.1f} ms/step  {calls[key] / args.steps:4.0f} calls  {rate}")
    rest = step - sum(seconds.values()) / args.steps
    print(f"  {'everything else':34} {rest * 1e3:7.1f} ms/step")


if __name__ == "__main__":
    main()
