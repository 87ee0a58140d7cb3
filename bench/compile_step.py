"""Eager against torch.compile'd decode steps on one engine, alternating blocks of steps so that both see the
same machine load (this shared machine swings 20-40% between minutes; `kataru bench` measures rows one
after the other). Prints each mode's median ms per step and the ratio.

usage: .venv/bin/python bench/compile_step.py [--shape llm-jp-3.1-1.8b] [--layers N] [--quantize int8|int4]
                                                 [--batch 1] [--rounds 6] [--steps 5]
"""

from __future__ import annotations

import argparse
import time

import torch
from common import shape_arguments, shape_engine, shape_model

from kataru.bench import alternate


def main() -> None:
    parser = argparse.ArgumentParser()
    shape_arguments(parser)
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--steps", type=int, default=5, help="decode steps per block")
    args = parser.parse_args()
    model = shape_model(args.shape, args.layers, args.quantize)
    engine = shape_engine(model, args.batch, 2 * args.rounds * args.steps + 8, compile=True)
    compiled = engine.runner.decode_step
    start = time.perf_counter()
    for _ in range(3):  # prefill, then the compilation and its first runs
        engine.step()
    print(f"prefill and compilation: {time.perf_counter() - start:.1f} s")

    def steps() -> None:
        for _ in range(args.steps):
            engine.step()

    medians = alternate(steps, {"eager": lambda: setattr(engine.runner, "decode_step", model.decode),
                                "compiled": lambda: setattr(engine.runner, "decode_step", compiled)}, args.rounds)
    eager, comp = (medians[m] / args.steps * 1e3 for m in ("eager", "compiled"))
    label = " ".join([args.shape, *([f"{args.layers} layers"] if args.layers else []), args.quantize or "bf16"])
    print(f"{label}, batch {args.batch}, {torch.get_num_threads()} threads: eager {eager:.1f} ms/step, "
          f"compiled {comp:.1f} ms/step, {eager / comp:.2f}x (medians of {args.rounds} blocks of {args.steps} steps)")


if __name__ == "__main__":
    main()
