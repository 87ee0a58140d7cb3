"""Arguments several commands share, and the one place they become library calls."""

from __future__ import annotations

import argparse
from dataclasses import fields
from typing import Any

DTYPE_HELP = "auto (as the checkpoint was saved), float32, bfloat16 or float16"


def add_model(p: argparse.ArgumentParser, required: bool = False) -> None:
    """The model folder first (the embedded kataru-tiny-ja when omitted), then how to load it."""
    if required:
        p.add_argument("model", help="local Hugging Face checkpoint folder")
    else:
        p.add_argument("model", nargs="?", help="local Hugging Face checkpoint folder (default: the embedded "
                                                "kataru-tiny-ja)")
    p.add_argument("--dtype", default="auto", help=DTYPE_HELP)
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    p.add_argument("--quantize", choices=["int8", "int4"], help="weight-only quantization after loading")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the decode step (slow first step; eager fallback if unavailable)")
    p.add_argument("--batch-invariant", action="store_true",
                   help="one matmul path for every batch size: a request decodes to the same bits alone or batched")


def add_speculation(p: argparse.ArgumentParser, default: str | None = None,
                    title: str = "speculative decoding (greedy: the same tokens; sampling: the same distribution)"
                    ) -> None:
    from kataru.engine.speculate import DEFAULT_NGRAM, DEFAULT_TOKENS

    group = p.add_argument_group(title)
    group.add_argument("--speculate", metavar="ngram|draft:FOLDER", default=default,
                       help="propose tokens by prompt lookup (ngram) or by a smaller checkpoint with the same "
                            "tokenizer (draft:FOLDER), verify them in one pass, keep what the model agrees with")
    group.add_argument("--speculate-tokens", type=int, default=DEFAULT_TOKENS, metavar="K",
                       help="proposals per sequence and step at most (fewer where they do not pay)")
    group.add_argument("--speculate-min-ngram", type=int, default=DEFAULT_NGRAM[0], metavar="N",
                       help="prompt lookup: the shortest n-gram matched")
    group.add_argument("--speculate-max-ngram", type=int, default=DEFAULT_NGRAM[1], metavar="N",
                       help="prompt lookup: the longest n-gram matched (tried first)")


def speculation(args: argparse.Namespace) -> dict[str, Any]:
    """`kataru.load`'s speculation arguments from the flags."""
    from kataru.engine.speculate import DEFAULT_NGRAM, DEFAULT_TOKENS

    return {"speculate": getattr(args, "speculate", None),
            "speculate_tokens": getattr(args, "speculate_tokens", DEFAULT_TOKENS),
            "speculate_ngram": (getattr(args, "speculate_min_ngram", DEFAULT_NGRAM[0]),
                                getattr(args, "speculate_max_ngram", DEFAULT_NGRAM[1]))}


def add_sampling(p: argparse.ArgumentParser) -> None:
    p.add_argument("--prompt-style", help="llm-jp, alpaca-ja, rinna or raw (default: from the checkpoint)")
    p.add_argument("--system", help="replace the card's system message")
    p.add_argument("--max-new-tokens", type=int, help="at most this many new tokens (default: the card's)")
    p.add_argument("--temperature", type=float, help="0 means greedy (default: the card's)")
    p.add_argument("--top-k", type=int, help="0 turns it off (default: the card's, else 50)")
    p.add_argument("--top-p", type=float, help="nucleus sampling (default: the card's, else 1)")
    p.add_argument("--repetition-penalty", type=float, help="CTRL rule, 1 turns it off (default: the card's)")
    p.add_argument("--seed", type=int, help="seed for reproducible sampling")
    p.add_argument("--stop", action="append", help="stop string (repeatable)")
    p.add_argument("--ignore-eos", action="store_true", help="keep generating to --max-new-tokens")


def sampling(args: argparse.Namespace) -> dict[str, Any]:
    return {"max_new_tokens": args.max_new_tokens, "temperature": args.temperature, "top_k": args.top_k,
            "top_p": args.top_p, "repetition_penalty": args.repetition_penalty, "seed": args.seed,
            "stop": args.stop, "ignore_eos": args.ignore_eos or None}


def read_stdin() -> str:
    """Standard input as UTF-8 text, without the newline that ends its last line."""
    import sys

    from kataru.errors import KataruError

    data = sys.stdin.buffer.read()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise KataruError(f"standard input is not UTF-8 text (byte {err.start}); convert it (e.g. iconv -f "
                          "SHIFT_JIS -t UTF-8)") from None
    return text[:-1] if text.endswith("\n") else text


def load(args: argparse.Namespace):  # type: ignore[no-untyped-def]
    from kataru.llm import DEFAULT_MODEL, load

    return load(args.model or DEFAULT_MODEL, dtype=args.dtype, device=args.device,
                prompt_style=getattr(args, "prompt_style", None), quantize=args.quantize,
                compile=getattr(args, "compile", False), batch_invariant=getattr(args, "batch_invariant", False),
                **speculation(args))


def add_train_config(p: argparse.ArgumentParser, **defaults: Any) -> None:
    """TrainConfig's fields as flags, with their help and (shown in --help) defaults."""
    from kataru.train.loop import TRAIN_HELP, TrainConfig

    base = {f.name: f.default for f in fields(TrainConfig)}
    base.update(defaults)
    group = p.add_argument_group("training")
    for name, default in base.items():
        flag = "--" + name.replace("_", "-")
        if isinstance(default, bool):
            group.add_argument(flag, action="store_true", default=default, help=TRAIN_HELP[name])
        else:
            group.add_argument(flag, type=type(default), default=default, help=TRAIN_HELP[name])
    p.add_argument("--out", required=True, help="run folder: checkpoints/, log.jsonl, loss.png, final/")
    p.add_argument("--resume", nargs="?", const="latest", choices=["latest", "auto"],
                   help="continue from the latest checkpoint in --out; `--resume auto` also starts a new run when "
                        "there is none (the one command for torchrun --max-restarts and batch schedulers)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def add_lora(p: argparse.ArgumentParser) -> None:
    p.add_argument("--lora", action="store_true", help="train LoRA adapters only (merge with `kataru merge-lora`)")
    p.add_argument("--lora-r", type=int, default=8, help="adapter rank")
    p.add_argument("--lora-alpha", type=float, default=16.0, help="adapter scale numerator (scale = alpha / r)")
    p.add_argument("--lora-dropout", type=float, default=0.0, help="dropout on the adapter's input")
    p.add_argument("--lora-targets", default="wqkv,wo,w1,w2", help="projections to adapt, comma-separated")
    p.only_with("--lora", "--lora-r", "--lora-alpha", "--lora-dropout", "--lora-targets")


def train(args: argparse.Namespace, model: Any, task: Any, meta: dict[str, Any]) -> None:
    """Run the one training loop on a task and copy the last checkpoint's model to out/final."""
    from pathlib import Path

    from kataru.errors import KataruError
    from kataru.train.loop import TrainConfig, Trainer

    out = Path(args.out)
    config = TrainConfig(**{f.name: getattr(args, f.name) for f in fields(TrainConfig)})
    trainer = Trainer(model, task, config, out, meta, progress=not args.no_progress)
    if args.resume == "latest" or (args.resume == "auto" and trainer.latest() is not None):
        trainer.resume()
    elif trainer.latest() is not None:
        raise KataruError(f"{out} already holds checkpoints; pass --resume to continue or choose a new --out")
    trainer.run()
    final = trainer.finish()
    if final is not None:
        print(final)


def policy(args: argparse.Namespace) -> tuple[dict[str, Any], Any, Any]:
    """(hf config, trainable model, weights saver) for fine-tuning args.model, full or LoRA."""
    from pathlib import Path

    from kataru.errors import KataruError
    from kataru.train.weights import AdapterWeights, FullWeights, load_trainable

    folder = Path(args.model)
    if not folder.is_dir():
        raise KataruError(f"model folder {folder} does not exist")
    hf, model = load_trainable(folder)
    if args.seq_len > hf.get("max_position_embeddings", args.seq_len):
        raise KataruError(f"--seq-len {args.seq_len} exceeds the model context {hf['max_position_embeddings']}")
    if args.lora:
        from kataru.train.lora import apply_lora

        targets = tuple(t for t in args.lora_targets.split(",") if t)
        config = apply_lora(model, args.lora_r, args.lora_alpha, args.lora_dropout, targets)
        config["base_model"] = str(folder.resolve())
        return hf, model, AdapterWeights(config)
    return hf, model, FullWeights(hf, folder)


def style_and_tokenizer(folder: Any) -> tuple[Any, Any]:
    """The prompt style and tokenizer a checkpoint generates with (training renders rows the same way)."""
    from kataru.llm import prompt_style_of
    from kataru.tokenizer import Tokenizer

    tokenizer = Tokenizer(folder)
    return prompt_style_of(folder, tokenizer), tokenizer
