"""How many multiply-adds a serving target needs, against what this CPU's matmuls and its FMA units do.

A run of `kataru bench serve` (the JSON of `bench/llamacpp_serve.sh`) moves a known number of tokens
through a model of known size: every prompt token and every generated token costs about two FLOPs per
weight it passes (the output head only for generated ones). This prints the FLOP/s each server sustained,
the FLOP/s that 1.5x llama-server's tokens/s would need, and, on matmuls of the model's shape with as many
rows as a decode step (8, 32) or a prompt chunk (128, 512) has: torch's own float32 and bf16 GEMM and
kataru's packed bf16 kernel; then the ceiling of them all, the float32 FMA throughput of every core (12
independent 8-wide FMA chains per thread, built as kataru's kernels are).

usage: .venv/bin/python bench/gemm_peak.py docs/bench-serve-bf16.json [--folder /tmp/kataru-llamacpp/hf]
"""

from __future__ import annotations

import argparse
import ctypes
import json
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

from kataru import kernels
from kataru.config import ModelConfig
from kataru.shapes import shape_config


def rate(matmul: Callable[[], object], flops: int, seconds: float = 3.0) -> float:
    """FLOP/s of repeated calls of `matmul` (after one warm-up call) for `seconds`."""
    matmul()
    calls, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        matmul()
        calls += 1
    return flops * calls / (time.perf_counter() - start)


def gemm_rate(rows: int, inner: int, outer: int, dtype: torch.dtype, seconds: float = 3.0) -> float:
    a, b = torch.randn(rows, inner, dtype=dtype), torch.randn(inner, outer, dtype=dtype)
    return rate(lambda: a @ b, 2 * rows * inner * outer, seconds)


def packed_rate(rows: int, inner: int, outer: int, seconds: float = 3.0) -> float:
    packed = kernels.pack_bf16(torch.randn(outer, inner).bfloat16())
    x = torch.randn(rows, inner).bfloat16()
    return rate(lambda: kernels.linear_packed(x, packed), 2 * rows * inner * outer, seconds)


FMA_LOOP = r"""
#include <immintrin.h>
double fma_flops(long steps) {  /* float32 FLOPs done by this thread: 12 independent chains of 8-wide FMAs */
    __m256 a[12], b = _mm256_set1_ps(1.0f), c = _mm256_set1_ps(1e-9f);
    for (int i = 0; i < 12; i++) a[i] = _mm256_set1_ps((float)i);
    for (long s = 0; s < steps; s++)
#pragma GCC unroll 12
        for (int i = 0; i < 12; i++) a[i] = _mm256_fmadd_ps(a[i], b, c);
    float sink = 0;
    for (int i = 0; i < 12; i++) sink += a[i][0];
    return sink > 0 ? 12.0 * 16 * steps : 0;
}
double fma_peak(long steps, int threads) {
    double flops = 0;
    #pragma omp parallel num_threads(threads) reduction(+:flops)
    flops += fma_flops(steps);
    return flops;
}
"""


def fma_peak(seconds: float = 2.0) -> float:
    """FLOP/s of independent float32 FMAs on every thread torch uses: no matmul can go faster."""
    with tempfile.TemporaryDirectory() as tmp:
        source = Path(tmp) / "fma_peak.c"
        source.write_text(FMA_LOOP)
        library = kernels.build((source,))  # the kernels' compiler ($CC) and flags, cached like them
    peak = ctypes.CDLL(str(library)).fma_peak
    peak.restype, peak.argtypes = ctypes.c_double, [ctypes.c_long, ctypes.c_int]
    steps, best = 1 << 20, 0.0
    start = time.perf_counter()
    while time.perf_counter() - start < seconds:
        t = time.perf_counter()
        best = max(best, peak(steps, torch.get_num_threads()) / (time.perf_counter() - t))
    return best


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("report", help="JSON written by kataru bench serve --json")
    parser.add_argument("--shape", default="llm-jp-3.1-1.8b", help="the model shape the report served")
    args = parser.parse_args()
    config = ModelConfig.from_hf(shape_config(args.shape))
    head = config.vocab_size * config.dim
    body = config.num_parameters() - head * (1 if config.tie_embeddings else 2)
    report = json.load(open(args.report))
    print(f"{args.shape}: {body / 1e9:.2f} G weights in the blocks, {head / 1e9:.2f} G in the output head")
    for run in report["runs"]:
        prompt_tokens = run["requests"] * report["prompt_tokens"]
        flops = 2 * body * (prompt_tokens + run["output_tokens"]) + 2 * head * run["output_tokens"]
        run["gflops"] = flops / run["seconds"] / 1e9
        print(f"  {run['server']:>12} at {run['concurrency']:>2} streams: {run['output_tok_s']:6.2f} output tok/s, "
              f"{run['gflops']:6.1f} GFLOP/s sustained")
    rates = {}
    for rows in (8, 32, 128, 512):
        rates[rows] = gemm_rate(rows, config.dim, config.intermediate_size, torch.float32)
        print(f"  torch float32 GEMM {rows}x{config.dim}x{config.intermediate_size}: {rates[rows] / 1e9:6.1f} GFLOP/s "
              f"({torch.get_num_threads()} threads)")
    bf16 = gemm_rate(128, config.dim, config.intermediate_size, torch.bfloat16, seconds=1.0)
    print(f"  torch bfloat16 GEMM 128x{config.dim}x{config.intermediate_size}: {bf16 / 1e9:6.1f} GFLOP/s")
    if kernels.available():
        for rows in (8, 32, 128):
            packed = packed_rate(rows, config.dim, config.intermediate_size)
            print(f"  kataru packed bf16 {rows}x{config.dim}x{config.intermediate_size}: {packed / 1e9:6.1f} GFLOP/s")
    peak = fma_peak()
    print(f"  float32 FMA throughput ({torch.get_num_threads()} threads): {peak / 1e9:6.1f} GFLOP/s")
    for concurrency in sorted({r["concurrency"] for r in report["runs"]}):
        llama = next(r for r in report["runs"] if r["server"] == "llama-server" and r["concurrency"] == concurrency)
        print(f"  at {concurrency} streams, 1.5x llama-server is {1.5 * llama['output_tok_s']:.2f} output tok/s: "
              f"{1.5 * llama['gflops']:.1f} GFLOP/s sustained over prompts and decode steps alike, "
              f"{1.5 * llama['gflops'] * 1e9 / peak:.0%} of the FMA throughput")

if __name__ == "__main__":
    main()
