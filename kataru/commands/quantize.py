"""`kataru quantize`: a weight-only quantized copy of a checkpoint that kataru loads back as it is."""

from __future__ import annotations

import argparse

from kataru.commands.common import DTYPE_HELP


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="local checkpoint folder")
    p.add_argument("out", help="folder to write")
    p.add_argument("--method", choices=["int8", "int4"], default="int8", help="int8 per row, or int4 groups")
    p.add_argument("--dtype", default="auto", help=f"activations and unquantized weights: {DTYPE_HELP}")


def run(args: argparse.Namespace) -> None:
    from kataru.llm import load

    llm = load(args.model, dtype=args.dtype, quantize=args.method)
    print(llm.save_quantized(args.out))
