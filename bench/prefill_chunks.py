"""What chunked prefill buys and costs: running requests decode while a long prompt arrives; for each chunk size
the longest wait between two of their tokens (one step: a chunk, then their decode step) and the long prompt's
time to its first token. Chunk sizes take turns in each round so that all see the same machine load; medians
of the rounds are printed.

usage: .venv/bin/python bench/prefill_chunks.py [--shape llm-jp-3.1-1.8b] [--layers N]
           [--quantize int8|int4] [--batch 1] [--prompt-tokens 512] [--chunks none,256,128,64] [--rounds 3]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from common import shape_arguments, shape_model

from kataru.engine import Engine
from kataru.sampling import SamplingParams


def one_arrival(model: torch.nn.Module, chunk: int | None, batch: int, prompt: list[int]) -> tuple[float, float]:
    """(longest step while the prompt is prefilled, seconds to its first token) with `batch` requests running."""
    params = SamplingParams(max_new_tokens=8, do_sample=False, ignore_eos=True)
    engine = Engine(model, set(), max_batch=batch + 1, row_len=len(prompt) + 64, prefill_chunk=chunk,
                    prefix_reuse=False)
    for i in range(batch):
        engine.submit(list(range(5 + i, 37 + i)), SamplingParams(max_new_tokens=48, do_sample=False, ignore_eos=True))
    engine.step()  # their prefill
    engine.step()  # and a decode step: they run
    arrival = engine.submit(prompt, params)
    start, longest = time.perf_counter(), 0.0
    while not arrival.tokens:
        before = time.perf_counter()
        engine.step()
        longest = max(longest, time.perf_counter() - before)
    return longest, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser()
    shape_arguments(parser)
    parser.add_argument("--prompt-tokens", type=int, default=512)
    parser.add_argument("--chunks", default="none,256,128,64")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    chunks = [None if c == "none" else int(c) for c in args.chunks.split(",")]
    model = shape_model(args.shape, args.layers, args.quantize)
    prompt = torch.randint(3, model.config.vocab_size, (args.prompt_tokens,)).tolist()
    one_arrival(model, 64, args.batch, prompt[:80])  # warm-up: caches, kernels, buffers
    results: dict[int | None, list[tuple[float, float]]] = {c: [] for c in chunks}
    for _ in range(args.rounds):
        for chunk in chunks:
            results[chunk].append(one_arrival(model, chunk, args.batch, prompt))
    print(f"{args.shape} ({model.config.n_layer} layers) {args.quantize or 'bf16'}, {args.batch} running, "
          f"a {args.prompt_tokens}-token prompt arrives; medians of {args.rounds} rounds, {torch.get_num_threads()} "
          f"threads, torch {torch.__version__}")
    print(f"{'chunk':>6} {'longest gap s':>14} {'prompt TTFT s':>14} {'prefill tok/s':>14}")
    for chunk, runs in results.items():
        gap = statistics.median(r[0] for r in runs)
        ttft = statistics.median(r[1] for r in runs)
        print(f"{chunk or 'whole':>6} {gap:>14.2f} {ttft:>14.2f} {args.prompt_tokens / ttft:>14.1f}")


if __name__ == "__main__":
    main()
