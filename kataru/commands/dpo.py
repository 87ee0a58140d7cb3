"""`kataru dpo`: Direct Preference Optimization against the starting model, full or LoRA."""

from __future__ import annotations

import argparse

from kataru.commands import common

FORMATTER = argparse.ArgumentDefaultsHelpFormatter


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="Hugging Face folder (the policy starts here and it is the reference)")
    p.add_argument("--data", required=True, help="JSONL with prompt, chosen, rejected")
    p.add_argument("--beta", type=float, default=0.1, help="DPO's beta: how far the policy may move")
    p.add_argument("--seq-len", type=int, default=256, help="tokens per sequence at most")
    common.add_lora(p)
    common.add_train_config(p, lr=5e-5, warmup_steps=10, max_steps=100, batch_size=8, eval_every=25,
                            save_every=25, weight_decay=0.0)


def run(args: argparse.Namespace) -> None:
    from pathlib import Path

    from kataru.files import read_jsonl
    from kataru.train.dpo import DPOTask
    from kataru.train.weights import load_trainable

    rows = read_jsonl(Path(args.data))
    hf, model, weights = common.policy(args)
    _, reference = load_trainable(Path(args.model))
    style, tokenizer = common.style_and_tokenizer(Path(args.model))
    task = DPOTask(rows, style, tokenizer, args.seq_len, reference.requires_grad_(False), args.beta, weights)
    del reference
    meta = {"name": "dpo", "model": hf, "data": args.data, "beta": args.beta, "lora": getattr(weights, "config", None)}
    common.train(args, model, task, meta)
