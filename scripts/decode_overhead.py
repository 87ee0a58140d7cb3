"""What a decode step costs besides its kernels: the engine steps with every C kernel call replaced by a no-op,
so the time left is Python, torch's dispatch and the small torch ops between the kernels (norms, SwiGLU,
residual adds, sampling). Prints ms per step and the torch profiler's top operators.

usage: .venv/bin/python scripts/decode_overhead.py [--shape llm-jp-3.1-1.8b] [--layers N] [--quantize int8|int4]
                                                   [--batch 1] [--steps 30] [--cheap norm|swiglu]
The logits are garbage once the kernels are stubbed; only the time means anything. `--cheap norm` (or
`swiglu`) also replaces every RMSNorm by one multiply (SwiGLU by a slice) and alternates blocks of steps
with and without, to show what fusing that part into one kernel could save at most.
"""

from __future__ import annotations

import argparse
import time

from torch.profiler import ProfilerActivity, profile

from kataru import kernels
from kataru import model as kataru_model
from kataru.bench import alternate, shape_arguments, shape_engine


class NoKernels:
    """Stands in for the compiled library: every kataru_* function returns at once."""

    def __getattr__(self, name: str):  # type: ignore[no-untyped-def]
        return lambda *args: None


def main() -> None:
    parser = argparse.ArgumentParser()
    shape_arguments(parser)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--cheap", choices=["norm", "swiglu"], help="also time the steps with this part cheapened")
    args = parser.parse_args()
    if not kernels.available():
        raise SystemExit("kataru's CPU kernels are unavailable here (no C compiler, no AVX2, or KATARU_KERNELS=0)")
    _, engine = shape_engine(args, 2 * args.steps + 8 + (130 if args.cheap else 0))
    engine.step()  # prefill with the real kernels
    engine.step()
    kernels._state["lib"] = NoKernels()
    try:
        engine.step()
        start = time.perf_counter()
        for _ in range(args.steps):
            engine.step()
        ms = (time.perf_counter() - start) / args.steps * 1e3
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(10):
                engine.step()
        if args.cheap:
            cheapened = cheap_medians(engine, args.cheap)
    finally:
        del kernels._state["lib"]
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12))
    print(f"{args.shape} {args.quantize or 'bf16'}, batch {args.batch}: {ms:.2f} ms per decode step besides the "
          f"kernels (mean of {args.steps})")
    if args.cheap:
        print(f"alternating blocks of 10 steps: {cheapened[0]:.2f} ms as is, {cheapened[1]:.2f} ms with a cheap "
              f"{args.cheap} (medians of 6)")


def cheap_medians(engine: object, part: str, blocks: int = 6, steps: int = 10) -> tuple[float, float]:
    """Median ms per step with the model as it is and with `part` replaced by a single cheap op."""
    cls = kataru_model.RMSNorm if part == "norm" else kataru_model.FeedForward
    original = cls.forward

    def cheap_norm(self, x):  # type: ignore[no-untyped-def]
        return x * self.weight

    def cheap_feed_forward(self, x):  # type: ignore[no-untyped-def]
        gate_up = self.w1(x)
        return self.w2(gate_up[..., : gate_up.shape[-1] // 2])

    cheap = cheap_norm if part == "norm" else cheap_feed_forward

    def run() -> None:
        for _ in range(steps):
            engine.step()  # type: ignore[attr-defined]

    try:
        medians = alternate(run, {"as is": lambda: setattr(cls, "forward", original),
                                  "cheap": lambda: setattr(cls, "forward", cheap)}, blocks)
    finally:
        cls.forward = original  # type: ignore[method-assign]
    return medians["as is"] / steps * 1e3, medians["cheap"] / steps * 1e3

if __name__ == "__main__":
    main()
