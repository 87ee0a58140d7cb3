"""`kataru chat`: an interactive multi-turn conversation, streamed.

The conversation is never lost: when it outgrows the model's context the oldest turns are dropped (and
stderr says so); only a single message too long for the context on its own is refused. Ctrl-C during a
reply stops the reply, not the chat; Ctrl-C at the prompt clears the line; Ctrl-D or /exit ends it. On a
terminal, readline gives line editing and the history of what was typed.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from kataru.commands import common

PROMPT = "ユーザー> "


def add_arguments(p: argparse.ArgumentParser) -> None:
    common.add_model(p)
    common.add_sampling(p)
    common.add_speculation(p)


def fit(llm: Any, history: list[dict[str, str]], system: str | None, new_tokens: int) -> int:
    """Drop the oldest turns until the prompt and the reply's tokens fit the context; how many messages went.
    The last message (the user's) always stays: if it does not fit alone, KataruError says so."""
    from kataru.errors import KataruError

    context = llm.config.max_seq_len
    dropped = 0
    while True:
        size = len(llm.encode_prompt(history, system=system))
        if size + new_tokens <= context or (len(history) == 1 and size < context):
            return dropped
        if len(history) == 1:
            raise KataruError(f"this message is {size} tokens with the prompt, more than the model's context of "
                              f"{context}; shorten it")
        cut = 2 if len(history) > 2 and history[0]["role"] == "user" else 1  # a user turn and its answer
        del history[:cut]
        dropped += cut


def run(args: argparse.Namespace) -> None:
    interactive = sys.stdin.isatty()
    if interactive:
        import readline  # noqa: F401 - input() gets line editing and history
        import signal

        # Ctrl-C at the prompt is a KeyboardInterrupt even when kataru was started with SIGINT ignored (a
        # background job of a non-interactive shell, nohup wrappers): Python leaves an inherited SIG_IGN alone.
        signal.signal(signal.SIGINT, signal.default_int_handler)

    llm = common.load(args)
    sampling = common.sampling(args)
    llm.sampling(**sampling)  # a bad sampling flag is reported before the first message
    history: list[dict[str, str]] = []
    while True:
        try:
            if not turn(llm, history, args.system, sampling, interactive):
                break
        except KeyboardInterrupt:  # at the prompt, or between turns: a fresh line, the chat goes on
            print()


def turn(llm: Any, history: list[dict[str, str]], system: str | None, sampling: dict[str, Any],
         interactive: bool) -> bool:
    """Read one line and answer it (or run its command); False when the chat ends."""
    from kataru.errors import KataruError

    try:
        line = input(PROMPT if interactive else "")
    except EOFError:
        if interactive:
            print()
        return False
    if line.strip() in ("/exit", "/quit"):
        return False
    if line.strip() == "/reset":
        print(f"(the conversation was reset: {len(history)} messages forgotten)", file=sys.stderr)
        history.clear()
        return True
    if not line.strip():
        return True
    history.append({"role": "user", "content": line})
    try:
        dropped = fit(llm, history, system, llm.sampling(**sampling).max_new_tokens)
        if dropped:
            print(f"(the {dropped} oldest messages were dropped to fit the model's context of "
                  f"{llm.config.max_seq_len} tokens)", file=sys.stderr)
        reply, stopped = answer(llm, history, system, sampling)
    except KataruError as err:
        history.pop()
        print(f"kataru: {err}", file=sys.stderr)
        return True
    print("\n(stopped)" if stopped else "", file=sys.stderr if stopped else sys.stdout, flush=True)
    history.append({"role": "assistant", "content": reply})
    return True


def answer(llm: Any, history: list[dict[str, str]], system: str | None,
           sampling: dict[str, Any]) -> tuple[str, bool]:
    """(the reply as streamed, whether Ctrl-C stopped it). Ctrl-C only sets a flag, read between pieces, so a
    step is never cut in half; closing the stream ends the request and frees its row."""
    import signal
    import threading

    stop = threading.Event()
    previous = signal.signal(signal.SIGINT, lambda signum, frame: stop.set())
    reply = ""
    stream = llm.stream(history, system=system, **sampling)
    try:
        for piece in stream:
            print(piece, end="", flush=True)
            reply += piece
            if stop.is_set():
                break
    finally:
        stream.close()
        signal.signal(signal.SIGINT, previous)
    return reply, stop.is_set()
