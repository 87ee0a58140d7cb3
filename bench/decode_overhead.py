"""What a decode step costs besides its kernels: the engine steps with every C kernel call returning at once
(`kernels.stubbed()`), so the time left is Python, torch's dispatch and the small torch ops between the
kernels (norms outside the kernel, SwiGLU, residual adds, sampling). Prints ms per step and the torch
profiler's top operators.

usage: .venv/bin/python bench/decode_overhead.py [--shape llm-jp-3.1-1.8b] [--layers N] [--quantize int8|int4]
                                                 [--batch 1] [--steps 30]
The logits are zeros once the kernels are stubbed (garbage would read as a failed row and end the request);
only the time means anything.
"""

from __future__ import annotations

import argparse
import time

from common import shape_arguments, shape_engine, shape_model
from torch.profiler import ProfilerActivity, profile

from kataru import kernels


def main() -> None:
    parser = argparse.ArgumentParser()
    shape_arguments(parser)
    parser.add_argument("--steps", type=int, default=30, help="decode steps timed")
    args = parser.parse_args()
    if not kernels.available():
        raise SystemExit("kataru's CPU kernels are unavailable here (no C compiler, no AVX2, or KATARU_KERNELS=0)")
    engine = shape_engine(shape_model(args.shape, args.layers, args.quantize), args.batch, 2 * args.steps + 16)
    engine.step()  # prefill with the real kernels
    engine.step()
    with kernels.stubbed():
        engine.step()
        start = time.perf_counter()
        for _ in range(args.steps):
            engine.step()
        ms = (time.perf_counter() - start) / args.steps * 1e3
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(10):
                engine.step()
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12))
    print(f"{args.shape} {args.quantize or 'bf16'}, batch {args.batch}: {ms:.2f} ms per decode step besides the "
          f"kernels (mean of {args.steps})")


if __name__ == "__main__":
    main()
