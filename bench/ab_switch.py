"""One of kataru's CPU speed-ups switched off and on, alternating blocks on one model, medians printed.

usage: .venv/bin/python bench/ab_switch.py norm   [--shape llm-jp-3.1-1.8b] [--layers N] [--quantize int8|int4]
                                                  [--batch 1] [--blocks 6] [--steps 8]
       .venv/bin/python bench/ab_switch.py upcast [--shape llm-jp-3.1-1.8b] [--layers 4] [--blocks 6]
                                                  [--tokens 512]
       .venv/bin/python bench/ab_switch.py fuse   [--shape llm-jp-3.1-1.8b] [--quantize int8|int4] [--batch 8]
                                                  [--blocks 3] [--requests 16] [--tokens 128] [--new-tokens 128]
norm: decode steps with RMSNorm in torch's ops (`kernels.disabled("norm")`) against kataru's kernel.
upcast: bf16 prefills of --tokens tokens converting each weight to float32 whole before its GEMM against a
tile of rows at a time (`model.upcast_tile`).
fuse: a serving load on the engine (--batch streams, each finished request replaced by a new one of --tokens
prompt tokens and --new-tokens greedy tokens, --requests in all) with each step's prompt chunk and decode batch
in two passes against one (`Engine(fuse=...)`; the plan must let them fuse, as it does where kataru's kernels
serve every row count).
"""

from __future__ import annotations

import argparse
import contextlib

import torch
from common import shape_arguments, shape_engine, shape_model

from kataru import dispatch, kernels
from kataru import model as kataru_model
from kataru.bench import alternate
from kataru.engine import Engine
from kataru.sampling import SamplingParams

TILE = 1 << 20  # model.upcast_matmul's default tile, in weight elements


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("switch", choices=["norm", "upcast", "fuse"])
    shape_arguments(parser)
    parser.add_argument("--blocks", type=int, default=6, help="alternating blocks per mode")
    parser.add_argument("--steps", type=int, default=8, help="norm: decode steps per block")
    parser.add_argument("--tokens", type=int, default=None, help="prompt tokens (upcast: 512, fuse: 128)")
    parser.add_argument("--requests", type=int, default=16, help="fuse: requests per block")
    parser.add_argument("--new-tokens", type=int, default=128, help="fuse: tokens per request")
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
    if args.switch == "fuse":
        fuse(args)
        return
    args.tokens = args.tokens or 512
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


def fuse(args: argparse.Namespace) -> None:
    if args.batch < 2:
        raise SystemExit("fuse: give --batch N, N > 1 streams (a prompt chunk fuses with other requests' decoding)")
    model = shape_model(args.shape, args.layers, args.quantize)
    dispatch.prepare(model, progress=True)
    tokens = args.tokens or 128
    params = SamplingParams(max_new_tokens=args.new_tokens, do_sample=False, ignore_eos=True)
    prompt = torch.randint(3, model.config.vocab_size, (args.requests, tokens)).tolist()
    state: dict[str, bool] = {"fuse": True}
    fused: list[int] = []

    def serve() -> None:
        engine = Engine(model, set(), max_batch=args.batch, row_len=tokens + args.new_tokens, fuse=state["fuse"])
        pending = list(prompt)
        running = [engine.submit(pending.pop(), params) for _ in range(min(args.batch, len(pending)))]
        while engine.has_work():
            engine.step()
            for r in [r for r in running if r.done]:
                running.remove(r)
                if pending:
                    running.append(engine.submit(pending.pop(), params))
        if state["fuse"]:
            fused.append(engine.fused_steps)

    medians = alternate(serve, {"two passes": lambda: state.update(fuse=False),
                                "one pass": lambda: state.update(fuse=True)}, args.blocks)
    two, one = medians["two passes"], medians["one pass"]
    out = args.requests * args.new_tokens
    print(f"{args.shape} {args.quantize or 'bf16'}, {args.batch} streams, {args.requests} requests of {tokens} + "
          f"{args.new_tokens} tokens: prompt chunk and decode batch in two passes {out / two:.2f} output tok/s, "
          f"in one {out / one:.2f} ({two / one:.3f}x; medians of {args.blocks} blocks; {fused[-1]} fused steps)")


if __name__ == "__main__":
    main()
