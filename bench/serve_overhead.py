"""What HTTP adds to each streamed token: the same load (N concurrent requests, P-token prompts, O new tokens,
greedy, eos ignored, no penalties) run on the engine directly and through `kataru serve` (uvicorn in a thread
of this process, on loopback, streamed, the client in a process of its own at the lowest priority), taking
turns; prints both wall times and the difference per generated token against the engine's time per step.

usage: .venv/bin/python bench/serve_overhead.py FOLDER [--quantize int4] [--streams 8] [--prompt-tokens 128]
                                                [--output-tokens 128] [--rounds 9] [--loop-nice N]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from serve_helpers import Threaded

import kataru
from kataru.sampling import SamplingParams


def prompts(n: int, length: int, vocab: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(100, vocab) for _ in range(length)] for _ in range(n)]


def engine_run(llm: kataru.LLM, batch: list[list[int]], new: int) -> tuple[float, int]:
    """(seconds, steps) for the batch on the engine alone."""
    params = SamplingParams(max_new_tokens=new, do_sample=False, ignore_eos=True)
    engine = llm.engine
    start = time.perf_counter()
    requests = [engine.submit(p, params) for p in batch]
    steps = 0
    while engine.has_work():
        engine.step()
        steps += 1
    assert all(len(r.tokens) == new for r in requests)
    return time.perf_counter() - start, steps


async def http_run(base: str, batch: list[list[int]], new: int) -> float:
    """The streamed requests, all at once; the sampling of the engine run (no card defaults such as a
    repetition penalty)."""
    async with httpx.AsyncClient(timeout=600) as client:
        async def one(prompt: list[int]) -> None:
            body = {"prompt": prompt, "max_tokens": new, "temperature": 0, "stream": True, "ignore_eos": True,
                    "repetition_penalty": 1.0, "top_p": 1.0, "top_k": 0}
            async with client.stream("POST", f"{base}/v1/completions", json=body) as response:
                async for _ in response.aiter_lines():
                    pass

        start = time.perf_counter()
        await asyncio.gather(*(one(p) for p in batch))
        return time.perf_counter() - start


def client(base: str, batch: list[list[int]], new: int) -> float:
    """http_run in a process of its own at the lowest priority: as near to a client on another machine as one
    machine allows (its parsing does not run in the server's process, nor ahead of it)."""
    code = ("import asyncio, json, os, sys; sys.path.insert(0, 'bench'); os.nice(19); import serve_overhead as s; "
            "a = json.load(sys.stdin); print(asyncio.run(s.http_run(a['base'], a['batch'], a['new'])))")
    done = subprocess.run([sys.executable, "-c", code], input=json.dumps({"base": base, "batch": batch, "new": new}),
                          capture_output=True, text=True, check=True, cwd=Path(__file__).resolve().parents[1])
    return float(done.stdout.split()[-1])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("folder")
    parser.add_argument("--quantize", choices=["int8", "int4"])
    parser.add_argument("--streams", type=int, default=8)
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--output-tokens", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--loop-nice", type=int, default=0, help="niceness of the server's event-loop thread")
    args = parser.parse_args()
    server = Threaded(lambda: kataru.load(args.folder, quantize=args.quantize, max_batch=args.streams,
                                          progress=False))
    llm = server.server.llm
    if args.loop_nice:
        os.setpriority(os.PRIO_PROCESS, server.thread.native_id, args.loop_nice)
    vocab = llm.tokenizer.vocab_size
    direct, served, steps = [], [], 0
    try:
        for r in range(args.rounds):
            batch = prompts(args.streams, args.prompt_tokens, vocab, seed=r)
            seconds, steps = engine_run(llm, batch, args.output_tokens)
            direct.append(seconds)
            served.append(client(server.base, prompts(args.streams, args.prompt_tokens, vocab, seed=100 + r),
                                 args.output_tokens))
    finally:
        server.stop()
    # A shared VM drifts by several percent between runs: each round's HTTP run is compared with the engine
    # run just before it, and the median and quartiles of those paired differences are reported.
    d, s = statistics.median(direct), statistics.median(served)
    tokens = args.streams * args.output_tokens
    step = d / steps
    shares = sorted((b - a) / a for a, b in zip(direct, served, strict=True))  # extra time / engine time
    q1, share, q3 = statistics.quantiles(shares, n=4) if len(shares) > 1 else (shares[0],) * 3
    per_token = share * d / tokens
    print(json.dumps({"folder": args.folder, "quantize": args.quantize, "streams": args.streams,
                      "engine_s": d, "served_s": s, "steps": steps, "step_ms": 1000 * step,
                      "http_ms_per_token": 1000 * per_token, "overhead_per_token_of_step": share,
                      "overhead_quartiles": [q1, q3], "rounds": [[a, b] for a, b in zip(direct, served, strict=True)]}))
    print(f"{args.streams} streams of {args.prompt_tokens}+{args.output_tokens} tokens, {args.rounds} rounds: engine "
          f"{d:.2f} s median ({steps} steps, {1000 * step:.1f} ms each), through HTTP {s:.2f} s; paired, HTTP adds "
          f"{1000 * per_token:.2f} ms per token, {100 * share:.1f}% of a step per step's {args.streams} tokens "
          f"(quartiles {100 * q1:.1f}% to {100 * q3:.1f}%)")


if __name__ == "__main__":
    main()
