"""Decode steps with RMSNorm on kataru's kernel against torch's ops, alternating blocks on one engine.

usage: .venv/bin/python scripts/bench_norm.py [--shape llm-jp-3.1-1.8b] [--layers N] [--quantize int8|int4]
                                              [--batch 1] [--blocks 6] [--steps 8]
Prints the median ms per step of each; the two differ only in how the norms run.
"""

from __future__ import annotations

import argparse
import time

from kataru import kernels
from kataru.bench import shape_arguments, shape_engine


def main() -> None:
    parser = argparse.ArgumentParser()
    shape_arguments(parser)
    parser.add_argument("--blocks", type=int, default=6)
    parser.add_argument("--steps", type=int, default=8)
    args = parser.parse_args()
    if not kernels.available():
        raise SystemExit("kataru's CPU kernels are unavailable here (no C compiler, no AVX2, or KATARU_KERNELS=0)")
    _, engine = shape_engine(args, 2 * args.blocks * args.steps + 4)
    engine.step()  # prefill
    engine.step()
    kernel = kernels.norm_applicable
    times: dict[str, list[float]] = {"torch": [], "kernel": []}
    try:
        for _ in range(args.blocks):
            for name, check in (("torch", lambda x, w: False), ("kernel", kernel)):
                kernels.norm_applicable = check
                start = time.perf_counter()
                for _ in range(args.steps):
                    engine.step()
                times[name].append((time.perf_counter() - start) / args.steps * 1e3)
    finally:
        kernels.norm_applicable = kernel
    torch_ms, kernel_ms = (sorted(t)[len(t) // 2] for t in times.values())
    print(f"{args.shape} {args.quantize or 'bf16'}, batch {args.batch}: norms in torch {torch_ms:.1f} ms/step, "
          f"on the kernel {kernel_ms:.1f} ms/step ({torch_ms / kernel_ms:.3f}x; medians of {args.blocks} blocks)")


if __name__ == "__main__":
    main()
