"""One of kataru's CPU speed-ups switched off and on, alternating blocks on one model, medians printed.

usage: .venv/bin/python bench/ab_switch.py norm   [--shape llm-jp-3.1-1.8b] [--layers N] [--quantize int8|int4]
                                                  [--batch 1] [--blocks 6] [--steps 8]
       .venv/bin/python bench/ab_switch.py upcast [--shape llm-jp-3.1-1.8b] [--layers 4] [--blocks 6]
                                                  [--tokens 512]
norm: decode steps with RMSNorm in torch's ops (`kernels.disabled("norm")`) against kataru's kernel.
upcast: bf16 prefills of --tokens tokens converting each weight to float32 whole before its GEMM against a
tile of rows at a time (`model.upcast_tile`).
"""

from __future__ import annotations

import argparse
import contextlib

import torch
from common import shape_arguments, shape_engine, shape_model

from kataru import kernels
from kataru import model as kataru_model
from kataru.bench import alternate

TILE = 1 << 20  # model.upcast_matmul's default tile, in weight elements


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("switch", choices=["norm", "upcast"])
    shape_arguments(parser)
    parser.add_argument("--blocks", type=int, default=6, help="alternating blocks per mode")
    parser.add_argument("--steps", type=int, default=8, help="norm: decode steps per block")
    parser.add_argument("--tokens", type=int, default=512, help="upcast: prompt tokens per prefill")
    args = parser.parse_args()
    mode: contextlib.ExitStack = contextlib.ExitStack()

    def switch(context: contextlib.AbstractContextManager | None) -> None:
        mode.close()
        if context is not None:
            mode.enter_context(context)

    if args.switch == "norm":
        if not kernels.available():
            raise SystemExit("kataru's CPU kernels are unavailable here (no C compiler, no AVX2, or KATARU_KERNELS=0)")
        engine = shape_engine(shape_model(args.shape, args.layers, args.quantize), args.batch,
                              2 * args.blocks * args.steps + 4)
        engine.step()  # prefill
        engine.step()

        def steps() -> None:
            for _ in range(args.steps):
                engine.step()

        with mode:
            medians = alternate(steps, {"off": lambda: switch(kernels.disabled("norm")),
                                        "on": lambda: switch(None)}, args.blocks)
        off, on = medians["off"] / args.steps * 1e3, medians["on"] / args.steps * 1e3
        print(f"{args.shape} {args.quantize or 'bf16'}, batch {args.batch}: norms in torch {off:.1f} ms/step, "
              f"on the kernel {on:.1f} ms/step ({off / on:.3f}x; medians of {args.blocks} blocks)")
        return
    model = shape_model(args.shape, args.layers or 4, None)
    ids = torch.randint(3, model.config.vocab_size, (1, args.tokens))

    def prefill() -> None:
        with torch.inference_mode():
            model(ids, last_only=True)

    prefill()
    with mode:
        medians = alternate(prefill, {"whole": lambda: switch(kataru_model.upcast_tile(1 << 62)),
                                      "tiles": lambda: switch(kataru_model.upcast_tile(TILE))}, args.blocks)
    whole, tiles = medians["whole"], medians["tiles"]
    print(f"{args.shape}, {model.config.n_layer} layers, {args.tokens}-token bf16 prefill: whole weights to float32 "
          f"{whole:.3f} s, tiles of {TILE} elements {tiles:.3f} s ({whole / tiles:.3f}x; medians of {args.blocks})")


if __name__ == "__main__":
    main()
