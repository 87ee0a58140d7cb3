"""The `kataru` command: one CLI, one subcommand per job, the model folder first.

Errors a user can fix print one line and exit with code 2 (set KATARU_DEBUG=1 for the traceback).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any

from kataru.errors import KataruError
from kataru.llm import DEFAULT_MODEL


def _add_model(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", nargs="?",
                   help="local Hugging Face checkpoint folder (default: the embedded kataru-tiny-ja)")
    p.add_argument("--dtype", default="auto", help="auto (as saved), float32, bfloat16 or float16")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, …")
    p.add_argument("--quantize", choices=["int8", "int4"], help="weight-only quantization after loading")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the decode step (slow first step; eager fallback if unavailable)")


def _add_prompting(p: argparse.ArgumentParser) -> None:
    p.add_argument("--prompt-style", help="llm-jp, alpaca-ja, rinna or raw (default: from the checkpoint)")
    p.add_argument("--system", help="replace the card's system message")
    p.add_argument("--max-new-tokens", type=int)
    p.add_argument("--temperature", type=float, help="0 means greedy")
    p.add_argument("--top-k", type=int)
    p.add_argument("--top-p", type=float)
    p.add_argument("--repetition-penalty", type=float)
    p.add_argument("--seed", type=int, help="seed for reproducible sampling")
    p.add_argument("--stop", action="append", help="stop string (repeatable)")
    p.add_argument("--ignore-eos", action="store_true", help="keep generating to --max-new-tokens")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kataru", description="Run Japanese instruction LLMs from local checkpoints.")
    sub = parser.add_subparsers(dest="command", required=True)

    info = sub.add_parser("info", help="family, parameters, dtype, context, prompt style, eos ids")
    _add_model(info)
    info.add_argument("--prompt-style")
    info.add_argument("--json", action="store_true")

    gen = sub.add_parser("generate", help="one prompt, in the model's own prompt format")
    _add_model(gen)
    gen.add_argument("prompt", help="the instruction (- reads standard input)")
    _add_prompting(gen)
    gen.add_argument("--inputs", help="the alpaca-ja 入力 field")
    gen.add_argument("--raw", action="store_true", help="send the prompt as is, without the template")
    gen.add_argument("--json", action="store_true",
                     help='print {"text", "token_ids", "prompt_token_ids", "finish_reason"}')

    chat = sub.add_parser("chat", help="interactive multi-turn chat, streamed (/reset, /exit)")
    _add_model(chat)
    _add_prompting(chat)

    tok = sub.add_parser("tokenize", help="token ids of a text, as the reference tokenizer gives them")
    tok.add_argument("model", help="local checkpoint folder (only its tokenizer files are read)")
    tok.add_argument("text", nargs="?", help="the text (or use --file)")
    tok.add_argument("--file", help="tokenize each line of this file")
    tok.add_argument("--special", action="store_true", help="add bos/eos as the tokenizer config says")
    tok.add_argument("--tokens", action="store_true", help="print the pieces beside the ids")
    tok.add_argument("--json", action="store_true", help="one JSON list per text")
    quant = sub.add_parser("quantize", help="write a weight-only quantized copy of a checkpoint")
    quant.add_argument("model", help="local checkpoint folder")
    quant.add_argument("out", help="folder to write")
    quant.add_argument("--method", choices=["int8", "int4"], default="int8")
    quant.add_argument("--dtype", default="bfloat16", help="dtype of activations and unquantized weights")

    bench = sub.add_parser("bench", help="prefill/decode speed vs the memory roofline (and transformers)")
    bench.add_argument("target", nargs="?", default=str(DEFAULT_MODEL),
                       help="a seed shape (llm-jp-3.1-1.8b, rinna-3.6b, jslm-3b-4e1t, gamma-7b, alpha-7b, tiny) "
                            "or a model folder (default: the embedded kataru-tiny-ja)")
    bench.add_argument("--dtype", default="bfloat16")
    bench.add_argument("--layers", type=int, help="fewer layers than the real shape (quick runs)")
    bench.add_argument("--compare", choices=["transformers"], help="run transformers on the same weights too")
    bench.add_argument("--prompt-tokens", type=int, default=512)
    bench.add_argument("--new-tokens", type=int, default=32)
    bench.add_argument("--context", type=int, default=16, help="prompt tokens before the timed decode steps")
    bench.add_argument("--threads", type=int)
    bench.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, … (both engines run there)")
    bench.add_argument("--compile", action="store_true", help="also measure the torch.compile'd decode step")
    bench.add_argument("--rounds", type=int, default=1,
                       help="measure every engine this many times, taking turns, and report medians")
    bench.add_argument("--quantize", help="also measure kataru with these, comma-separated: int8,int4")
    bench.add_argument("--quality", action="store_true",
                       help="perplexity on held-out text for the dtype and each --quantize method (a folder)")
    bench.add_argument("--text", help="held-out text for --quality (default: Aozora works in shared/)")
    bench.add_argument("--json", action="store_true")
    bench.add_argument("--plot", help="write a PNG chart here")
    from kataru.train.cli import add_commands

    COMMANDS.update(add_commands(sub))
    return parser


def _sampling(args: argparse.Namespace) -> dict[str, Any]:
    return {
        "max_new_tokens": args.max_new_tokens,
        "temperature": args.temperature,
        "top_k": args.top_k,
        "top_p": args.top_p,
        "repetition_penalty": args.repetition_penalty,
        "seed": args.seed,
        "stop": args.stop,
        "ignore_eos": args.ignore_eos or None,
    }


def _load(args: argparse.Namespace):  # type: ignore[no-untyped-def]
    from kataru.llm import load

    return load(args.model or DEFAULT_MODEL, dtype=args.dtype, device=args.device,
                prompt_style=getattr(args, "prompt_style", None),
                quantize=args.quantize, compile=getattr(args, "compile", False))


def cmd_info(args: argparse.Namespace) -> None:
    info = _load(args).info()
    if args.json:
        print(json.dumps(info, ensure_ascii=False))
        return
    width = max(len(k) for k in info)
    for key, value in info.items():
        if key == "parameters":
            value = f"{value:,}"
        print(f"{key:<{width}}  {value}")


def cmd_generate(args: argparse.Namespace) -> None:
    llm = _load(args)
    prompt = sys.stdin.read() if args.prompt == "-" else args.prompt
    options = {"inputs": args.inputs, "system": args.system, "raw": args.raw, **_sampling(args)}
    if args.json:
        completion = llm.complete([prompt], **options)[0]
        print(json.dumps(completion.to_dict(), ensure_ascii=False))
        return
    for piece in llm.stream(prompt, **options):
        print(piece, end="", flush=True)
    print()


def cmd_chat(args: argparse.Namespace) -> None:
    llm = _load(args)
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
        for piece in llm.stream(history, system=args.system, **_sampling(args)):
            print(piece, end="", flush=True)
            reply += piece
        print()
        history.append({"role": "assistant", "content": reply})


def cmd_tokenize(args: argparse.Namespace) -> None:
    from pathlib import Path

    from kataru.tokenizer import Tokenizer

    if not Path(args.model).is_dir():
        raise KataruError(f"model folder {args.model} does not exist; give the path of a local checkpoint folder")
    if (args.text is None) == (args.file is None):
        raise KataruError("give either a text or --file FILE")
    tokenizer = Tokenizer(args.model)
    if args.file:
        try:
            texts = Path(args.file).read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as err:
            raise KataruError(f"cannot read {args.file} as UTF-8 text ({err})") from None
    else:
        texts = [args.text]
    for text in texts:
        ids = tokenizer.encode(text, add_special_tokens=args.special)
        if args.json:
            row: Any = [[i, tokenizer.id_to_token(i)] for i in ids] if args.tokens else ids
            print(json.dumps(row, ensure_ascii=False))
        elif args.tokens:
            print(" ".join(f"{i}:{tokenizer.id_to_token(i)}" for i in ids))
        else:
            print(" ".join(map(str, ids)))


def cmd_quantize(args: argparse.Namespace) -> None:
    from kataru.llm import load

    llm = load(args.model, dtype=args.dtype, quantize=args.method)
    print(llm.save_quantized(args.out))


def cmd_bench(args: argparse.Namespace) -> None:
    from kataru.bench import main as bench_main

    bench_main(args)


COMMANDS: dict[str, Callable[[argparse.Namespace], None]] = {
    "bench": cmd_bench,
    "quantize": cmd_quantize,
    "info": cmd_info,
    "generate": cmd_generate,
    "chat": cmd_chat,
    "tokenize": cmd_tokenize,
}


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        COMMANDS[args.command](args)
    except KataruError as err:
        if os.environ.get("KATARU_DEBUG"):
            raise
        print(f"kataru: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130
    return 0


def run() -> int:
    """The `kataru` console script: main() with the garbage collector kept off what the imports made.

    torch's import leaves some 166,000 objects that live until exit; frozen, neither a collection during
    the run nor the interpreter's last one at exit walks them (`scripts/time-start.sh`: the first token
    0.1-0.3 s and the exit about 0.6 s sooner). Not in main(), which tests call in-process.
    """
    gc.freeze()
    return main()


if __name__ == "__main__":
    raise SystemExit(run())
