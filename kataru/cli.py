"""The `kataru` command: a table of subcommands, each in its own module under `kataru/commands/`.

Only the chosen command's module is imported (start-up time is part of what a CLI user feels). Errors a
user can fix print one line and exit with code 2 (set KATARU_DEBUG=1 for the traceback).
"""

from __future__ import annotations

import argparse
import gc
import importlib
import os
import sys
from collections.abc import Sequence
from types import ModuleType

from kataru.commands.options import Parser
from kataru.errors import KataruError

COMMANDS = {  # name: what it does (the module kataru/commands/<name>.py runs it)
    "info": "family, parameters, dtype, context, prompt style, eos ids, sampling defaults and their source",
    "generate": "one prompt, in the model's own prompt format",
    "chat": "interactive multi-turn chat, streamed (/reset, /exit)",
    "tokenize": "token ids of a text, as the reference tokenizer gives them",
    "quantize": "write a weight-only quantized copy of a checkpoint",
    "serve": "an OpenAI-compatible HTTP server (chat, completions, tokenize, metrics) on one engine",
    "bench": "measure: speed (vs the memory roofline and transformers), plan, speculate, serve",
    "eval": "evaluate: jglue, jcommonsenseqa, perplexity, lm-eval (any harness task), mt-bench",
    "data": "prepare training data: clean, tokenize, derive SFT/DPO sets",
    "train-tokenizer": "train a Unigram byte-fallback tokenizer (tokenizer.json)",
    "pretrain": "causal-LM pretraining of a new LLaMA-config model (or --init)",
    "sft": "supervised fine-tuning (full or --lora) on messages or instruction JSONL",
    "dpo": "Direct Preference Optimization on prompt/chosen/rejected JSONL",
    "merge-lora": "fold a LoRA adapter into its base weights",
}


def command(name: str) -> ModuleType:
    return importlib.import_module(f"kataru.commands.{name.replace('-', '_')}")


def build_parser(argv: Sequence[str], every: bool = False) -> Parser:
    """Every command listed; the arguments of the one named in argv (of all of them with `every`, which an
    error about an option of another command needs, and `--help` of none does not)."""
    parser = Parser(prog="kataru", description="Run, evaluate and train Japanese instruction LLMs from local "
                                               "checkpoint folders.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    chosen = next((a for a in argv if a in COMMANDS), None)
    for name, help_text in COMMANDS.items():
        module = command(name) if every or name == chosen else None
        formatter = getattr(module, "FORMATTER", argparse.HelpFormatter)
        p = sub.add_parser(name, help=help_text, description=help_text, formatter_class=formatter)
        if module is not None:
            module.add_arguments(p)
    if not every:
        parser.everything = lambda: build_parser(argv, every=True)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser(argv).parse_args(argv)
    try:
        command(args.command).run(args)
    except KataruError as err:
        if os.environ.get("KATARU_DEBUG"):
            raise
        print(f"kataru: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130
    except BrokenPipeError:  # the reader went away (`| head`): no traceback, and nothing more to write
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())  # so that the interpreter's final flush does not fail again
        print("kataru: error: the output was closed before kataru finished writing it (broken pipe)",
              file=sys.stderr)
        return 2
    return 0


def run() -> int:
    """The `kataru` console script: main() with the garbage collector kept off what the imports made.

    torch's import leaves some 166,000 objects that live until exit; frozen, neither a collection during
    the run nor the interpreter's last one at exit walks them (`bench/time-start.sh`: the first token
    0.1-0.3 s and the exit about 0.6 s sooner). Not in main(), which tests call in-process.
    """
    gc.freeze()
    return main()


if __name__ == "__main__":
    raise SystemExit(run())
