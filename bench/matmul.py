"""One matmul as kataru runs it against torch's (bf16, int8, int4), for decode rows (1, 8) or a prompt (512).

usage: .venv/bin/python bench/matmul.py [--out 14336] [--in 2048] [--rows 1,8] [--copies N] [--seconds 1.5]
Defaults: the fused gate+up weight of the llm-jp-3.1-1.8b shape. Several copies of the weight (512 MB in
all) are cycled so that every call reads from memory, as a decode step does; `--out 2048 --copies 1`
keeps one small weight in cache instead, which shows what the kernels compute when memory is no limit.
"torch" is `F.linear` for bf16 and, for the quantized modules without kataru's kernels, torch's packed
int8/int4 kernels for few rows or dequantizing into one float32 GEMM for a prompt (`--rows 512 --copies 1`:
a prompt's matmul is compute-bound, wherever the weight lies).
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from kataru import kernels
from kataru.model import Linear
from kataru.quantize import Int4Linear, Int8Linear


def seconds_per_call(fn: Callable[[torch.nn.Module], torch.Tensor], weights: list[torch.nn.Module],
                     budget: float) -> float:
    for w in weights:
        fn(w)
    calls, start = 0, time.perf_counter()
    while time.perf_counter() - start < budget:
        for w in weights:
            fn(w)
            calls += 1
    return (time.perf_counter() - start) / calls


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=int, default=14336)
    parser.add_argument("--in", dest="inp", type=int, default=2048)
    parser.add_argument("--rows", default="1,8", help="comma-separated row counts")
    parser.add_argument("--copies", type=int, default=None, help="default: 512 MB of weights, beyond any cache")
    parser.add_argument("--seconds", type=float, default=1.5)
    args = parser.parse_args()
    if not kernels.available():
        raise SystemExit("kataru's CPU kernels are unavailable here (no C compiler, no AVX2, or KATARU_KERNELS=0)")
    n, k = args.out, args.inp
    copies = args.copies or max(2, int(512e6 // (n * k * 2)))
    bf16 = [linear((torch.randn(n, k) * 0.02).bfloat16()) for _ in range(copies)]
    int8 = [Int8Linear.from_linear(m) for m in bf16]
    int4 = [Int4Linear.from_linear(m) for m in bf16]
    print(f"{n}x{k} weight, {copies} copies, {torch.get_num_threads()} threads, torch {torch.__version__}")
    print(f"{'rows':>4} {'kind':>5} {'torch ms':>9} {'kataru ms':>10} {'speed-up':>9} {'kataru GB/s':>12} "
          f"{'G mult-adds/s':>14}")
    for rows in map(int, args.rows.split(",")):
        x = torch.randn(rows, k).bfloat16()
        for kind, weights, ours, theirs, size in (
            ("bf16", bf16, lambda m, x=x: m(x), lambda m, x=x: F.linear(x, m.weight), 2.0),
            ("int8", int8, lambda m, x=x: m(x), None, 1.0),
            ("int4", int4, lambda m, x=x: m(x), None, 0.5 + 4 / Int4Linear(k, n, False, torch.bfloat16).group_size),
        ):
            t_ours = seconds_per_call(ours, weights, args.seconds)
            with kernels.disabled():  # the quantized modules fall back to torch's kernels
                t_torch = seconds_per_call(theirs or ours, weights, args.seconds)
            gbs = n * k * size / t_ours / 1e9
            print(f"{rows:>4} {kind:>5} {1e3 * t_torch:>9.2f} {1e3 * t_ours:>10.2f} {t_torch / t_ours:>8.2f}x "
                  f"{gbs:>12.1f} {rows * n * k / t_ours / 1e9:>14.1f}")


def linear(weight: torch.Tensor) -> Linear:
    """kataru's Linear on this weight: the bf16 kernel for few rows, float32 GEMM for a prompt's."""
    module = Linear(weight.shape[1], weight.shape[0], bias=False, dtype=weight.dtype).requires_grad_(False)
    module.weight.data = weight
    return module


if __name__ == "__main__":
    main()
