"""One of kataru's CPU speed-ups switched off and on, alternating blocks on one model, medians printed.

usage: .venv/bin/python scripts/bench_switch.py norm   [--shape llm-jp-3.1-1.8b] [--layers N] [--quantize int8|int4]
                                                       [--batch 1] [--blocks 6] [--steps 8]
       .venv/bin/python scripts/bench_switch.py upcast [--shape llm-jp-3.1-1.8b] [--layers 4] [--blocks 6]
                                                       [--tokens 512]
norm: decode steps with RMSNorm in torch's ops against kataru's kernel (`kernels/norm.c`).
upcast: bf16 prefills of --tokens tokens converting each weight to float32 whole before its GEMM against a
tile of rows at a time (`model.upcast_matmul`).
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
    parser.add_argument("--tokens", type=int, default=512, help="upcast: prompt tokens per prefill")
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
    model.setup_caches(1, args.tokens)
    ids = torch.randint(3, model.config.vocab_size, (1, args.tokens))
    tile = kataru_model.UPCAST_TILE

    def prefill() -> None:
        with torch.inference_mode():
            model(ids, start=0, last_only=True)

    prefill()
    try:
        medians = alternate(prefill, {"whole": lambda: setattr(kataru_model, "UPCAST_TILE", 1 << 62),
                                      "tiles": lambda: setattr(kataru_model, "UPCAST_TILE", tile)}, args.blocks)
    finally:
        kataru_model.UPCAST_TILE = tile
    whole, tiles = medians["whole"], medians["tiles"]
    print(f"{args.shape}, {model.config.n_layer} layers, {args.tokens}-token bf16 prefill: whole weights to float32 "
          f"{whole:.3f} s, tiles of {tile} elements {tiles:.3f} s ({whole / tiles:.3f}x; medians of {args.blocks})")


if __name__ == "__main__":
    main()
