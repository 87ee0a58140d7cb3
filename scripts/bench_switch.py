"""One of kataru's CPU speed-ups switched off and on, alternating blocks on one model, medians printed.

usage: .venv/bin/python scripts/bench_switch.py norm   [--shape llm-jp-3.1-1.8b] [--layers N] [--quantize int8|int4]
                                                       [--batch 1] [--blocks 6] [--steps 8]
       .venv/bin/python scripts/bench_switch.py upcast [--shape llm-jp-3.1-1.8b] [--layers 4] [--blocks 6]
norm: decode steps with RMSNorm in torch's ops against kataru's kernel (`kernels/norm.c`).
upcast: 512-token bf16 prefills upcasting each weight into a fresh tensor against the kept float32 buffer
(`model.upcast`).
"""

from __future__ import annotations

import argparse

import torch

from kataru import kernels
from kataru import model as kataru_model
from kataru.bench import alternate, build_shape, shape_arguments, shape_engine


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("switch", choices=["norm", "upcast"])
    shape_arguments(parser)
    parser.add_argument("--blocks", type=int, default=6)
    parser.add_argument("--steps", type=int, default=8)
    args = parser.parse_args()
    if args.switch == "norm":
        if not kernels.available():
            raise SystemExit("kataru's CPU kernels are unavailable here (no C compiler, no AVX2, or KATARU_KERNELS=0)")
        _, engine = shape_engine(args, 2 * args.blocks * args.steps + 4)
        engine.step()  # prefill
        engine.step()
        kernel = kernels.norm_applicable

        def steps() -> None:
            for _ in range(args.steps):
                engine.step()

        try:
            medians = alternate(steps, {"off": lambda: setattr(kernels, "norm_applicable", lambda x, w: False),
                                        "on": lambda: setattr(kernels, "norm_applicable", kernel)}, args.blocks)
        finally:
            kernels.norm_applicable = kernel
        off, on = medians["off"] / args.steps * 1e3, medians["on"] / args.steps * 1e3
        print(f"{args.shape} {args.quantize or 'bf16'}, batch {args.batch}: norms in torch {off:.1f} ms/step, "
              f"on the kernel {on:.1f} ms/step ({off / on:.3f}x; medians of {args.blocks} blocks)")
        return
    model, _ = build_shape(args.shape, args.layers or 4, torch.bfloat16, False)
    model.setup_caches(1, 512)
    ids = torch.randint(3, model.config.vocab_size, (1, 512))
    limit = kataru_model.UPCAST_SCRATCH_MAX

    def prefill() -> None:
        with torch.inference_mode():
            model(ids, start=0, last_only=True)

    prefill()
    try:
        medians = alternate(prefill, {"off": lambda: setattr(kataru_model, "UPCAST_SCRATCH_MAX", 0),
                                      "on": lambda: setattr(kataru_model, "UPCAST_SCRATCH_MAX", limit)}, args.blocks)
    finally:
        kataru_model.UPCAST_SCRATCH_MAX = limit
    off, on = medians["off"], medians["on"]
    print(f"{args.shape}, {model.config.n_layer} layers, 512-token bf16 prefill: fresh float32 weights "
          f"{off:.2f} s, kept buffer {on:.2f} s ({off / on:.3f}x; medians of {args.blocks})")


if __name__ == "__main__":
    main()
