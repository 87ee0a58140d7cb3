"""How many multiply-adds a serving target needs, against what this CPU's best GEMM does.

A run of `kataru bench serve` (the JSON of `bench/llamacpp_serve.sh`) moves a known number of tokens
through a model of known size: every prompt token and every generated token costs about two FLOPs per
weight it passes (the output head only for generated ones). This prints the FLOP/s each server sustained,
the FLOP/s that 1.5x llama-server's tokens/s would need, and torch's own float32 and bf16 GEMM rates on
matmuls of the model's shape with as many rows as a decode step (8, 32) or a prompt chunk (128, 512) has.

usage: .venv/bin/python bench/gemm_peak.py docs/bench-serve-bf16.json [--folder /tmp/kataru-llamacpp/hf]
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from kataru.config import ModelConfig
from kataru.shapes import shape_config


def gemm_rate(rows: int, inner: int, outer: int, dtype: torch.dtype, seconds: float = 3.0) -> float:
    a, b = torch.randn(rows, inner, dtype=dtype), torch.randn(inner, outer, dtype=dtype)
    a @ b
    calls, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        a @ b
        calls += 1
    return 2 * rows * inner * outer * calls / (time.perf_counter() - start)


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
    for concurrency in sorted({r["concurrency"] for r in report["runs"]}):
        llama = next(r for r in report["runs"] if r["server"] == "llama-server" and r["concurrency"] == concurrency)
        print(f"  at {concurrency} streams, 1.5x llama-server is {1.5 * llama['output_tok_s']:.2f} output tok/s: "
              f"{1.5 * llama['gflops']:.1f} GFLOP/s sustained over prompts and decode steps alike")

if __name__ == "__main__":
    main()
