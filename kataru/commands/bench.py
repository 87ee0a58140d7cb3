"""`kataru bench`: prefill and decode speed against the memory roofline (and transformers on the same weights)."""

from __future__ import annotations

import argparse

from kataru.commands.common import DTYPE_HELP


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("target", nargs="?",
                   help="a seed shape (llm-jp-3.1-1.8b, rinna-3.6b, jslm-3b-4e1t, gamma-7b, alpha-7b, tiny) with "
                        "random weights, or a model folder (default: the embedded kataru-tiny-ja)")
    p.add_argument("--dtype", default="auto", help=f"{DTYPE_HELP}; a shape is saved as its model is published")
    p.add_argument("--layers", type=int, help="fewer layers than the real shape (quick runs)")
    p.add_argument("--compare", choices=["transformers"], help="run transformers on the same weights too")
    p.add_argument("--prompt-tokens", type=int, default=512, help="prompt length timed for prefill")
    p.add_argument("--new-tokens", type=int, default=32, help="tokens timed for decode")
    p.add_argument("--context", type=int, default=16, help="prompt tokens before the timed decode steps")
    p.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ... (both engines run there)")
    p.add_argument("--compile", action="store_true", help="also measure the torch.compile'd decode step")
    p.add_argument("--rounds", type=int, default=1,
                   help="measure every engine this many times, taking turns, and report medians")
    p.add_argument("--quantize", help="also measure kataru with these, comma-separated: int8,int4")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.add_argument("--plot", help="write a PNG chart here")


def run(args: argparse.Namespace) -> None:
    import json

    from kataru.bench import format_table, plot, run_bench
    from kataru.llm import DEFAULT_MODEL

    report = run_bench(args.target or str(DEFAULT_MODEL), dtype=args.dtype, layers=args.layers,
                       compare=args.compare, prompt_len=args.prompt_tokens, new_tokens=args.new_tokens,
                       threads=args.threads, quantize=[m for m in (args.quantize or "").split(",") if m],
                       compile=args.compile, context=args.context, device=args.device, rounds=args.rounds)
    print(json.dumps(report) if args.json else format_table(report))
    if args.plot:
        plot(report, args.plot)
