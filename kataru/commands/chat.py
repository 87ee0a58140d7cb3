"""`kataru chat`: an interactive multi-turn conversation, streamed."""

from __future__ import annotations

import argparse

from kataru.commands import common


def add_arguments(p: argparse.ArgumentParser) -> None:
    common.add_model(p)
    common.add_sampling(p)


def run(args: argparse.Namespace) -> None:
    import sys

    llm = common.load(args)
    history: list[dict[str, str]] = []
    interactive = sys.stdin.isatty()
    while True:
        try:
            line = input("ユーザー> " if interactive else "")
        except EOFError:
            break
        if line.strip() in ("/exit", "/quit"):
            break
        if line.strip() == "/reset":
            history = []
            continue
        if not line.strip():
            continue
        history.append({"role": "user", "content": line})
        reply = ""
        for piece in llm.stream(history, system=args.system, **common.sampling(args)):
            print(piece, end="", flush=True)
            reply += piece
        print()
        history.append({"role": "assistant", "content": reply})
