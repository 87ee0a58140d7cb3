"""`kataru generate`: one prompt, in the model's own prompt format, streamed."""

from __future__ import annotations

import argparse

from kataru.commands import common


def add_arguments(p: argparse.ArgumentParser) -> None:
    common.add_model(p)
    p.add_argument("prompt", help="the instruction (- reads standard input)")
    common.add_sampling(p)
    p.add_argument("--inputs", help="the alpaca-ja 入力 field")
    p.add_argument("--raw", action="store_true", help="send the prompt as is, without the template")
    p.never_with("--raw", "--inputs", "--system", why="they are parts of the template")
    p.add_argument("--json", action="store_true",
                   help='print {"text", "token_ids", "prompt_token_ids", "finish_reason", "speculation"}')
    common.add_speculation(p)


def run(args: argparse.Namespace) -> None:
    import json

    llm = common.load(args)
    llm.sampling(**common.sampling(args))  # a bad sampling flag is reported before anything runs
    prompt = common.read_stdin() if args.prompt == "-" else args.prompt
    options = {"inputs": args.inputs, "system": args.system, "raw": args.raw, **common.sampling(args)}
    if args.json:
        completion = llm.complete([prompt], **options)[0]
        print(json.dumps(completion.to_dict(), ensure_ascii=False))
        return
    for piece in llm.stream(prompt, **options):
        print(piece, end="", flush=True)
    print()
