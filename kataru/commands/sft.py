"""`kataru sft`: supervised fine-tuning, full or LoRA, with the loss on the answers only."""

from __future__ import annotations

import argparse

from kataru.commands import common

FORMATTER = argparse.ArgumentDefaultsHelpFormatter


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="Hugging Face folder to fine-tune")
    p.add_argument("--data", required=True, help="JSONL with messages, or instruction/input/output")
    p.add_argument("--seq-len", type=int, default=256, help="tokens per example at most (longer are cut)")
    common.add_lora(p)
    common.add_train_config(p, lr=3e-4, warmup_steps=20, max_steps=300, eval_every=50, save_every=50)


def run(args: argparse.Namespace) -> None:
    from pathlib import Path

    from kataru.files import read_jsonl
    from kataru.train.sft import SFTTask

    rows = read_jsonl(Path(args.data))
    hf, model, weights = common.policy(args)
    style, tokenizer = common.style_and_tokenizer(Path(args.model))
    task = SFTTask(rows, style, tokenizer, args.seq_len, weights)
    meta = {"name": "sft" + (" (LoRA)" if args.lora else ""), "model": hf, "data": args.data,
            "lora": getattr(weights, "config", None), "skipped": task.skipped}
    common.train(args, model, task, meta)
