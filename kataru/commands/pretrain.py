"""`kataru pretrain`: causal-LM pretraining of a new LLaMA-config model (or one given with --init)."""

from __future__ import annotations

import argparse

from kataru.commands import common

FORMATTER = argparse.ArgumentDefaultsHelpFormatter


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", required=True, help="output of `kataru data tokenize`")
    p.add_argument("--tokenizer", help="tokenizer folder (default: the one the data was tokenized with)")
    p.add_argument("--init", help="continue from this Hugging Face folder instead of a new model")
    model = p.add_argument_group("a new model")
    model.add_argument("--dim", type=int, default=256, help="hidden size")
    model.add_argument("--layers", type=int, default=6, help="transformer blocks")
    model.add_argument("--heads", type=int, default=4, help="attention heads")
    model.add_argument("--kv-heads", type=int, help="key/value heads (default: --heads)")
    model.add_argument("--intermediate", type=int, default=704, help="SwiGLU width")
    model.add_argument("--context", type=int, default=1024, help="max_position_embeddings written to config.json")
    p.never_with("--init", "--dim", "--layers", "--heads", "--kv-heads", "--intermediate", "--context",
                 why="the model given with --init has its own shape")
    p.add_argument("--seq-len", type=int, default=256, help="tokens per training window")
    p.add_argument("--eval-windows", type=int, default=64, help="validation windows")
    common.add_train_config(p)


def run(args: argparse.Namespace) -> None:
    from pathlib import Path

    from kataru.errors import KataruError
    from kataru.files import read_json
    from kataru.tokenizer import Tokenizer
    from kataru.train.export import llama_config
    from kataru.train.pretrain import PretrainTask, new_model
    from kataru.train.weights import load_trainable

    data = Path(args.data)
    if not data.is_dir():
        raise KataruError(f"--data {data} does not exist; prepare it with `kataru data tokenize`")
    data_meta = read_json(data / "meta.json", "prepare the data again with `kataru data tokenize`", default={})
    tokenizer_folder = Path(args.tokenizer or args.init or data_meta.get("tokenizer") or "")
    if args.init:
        hf, model = load_trainable(Path(args.init))
    else:
        if not (tokenizer_folder / "tokenizer.json").is_file() and not list(tokenizer_folder.glob("*.model")):
            raise KataruError(f"no tokenizer in {tokenizer_folder}; pass --tokenizer")
        tokenizer = Tokenizer(tokenizer_folder)
        hf = llama_config(tokenizer.vocab_size, args.dim, args.layers, args.heads, args.intermediate, args.context,
                          n_kv_head=args.kv_heads, bos_token_id=tokenizer.bos_id, eos_token_id=tokenizer.eos_id,
                          pad_token_id=tokenizer.pad_id)
        model = new_model(hf, args.seed)
    if args.seq_len > hf["max_position_embeddings"]:
        raise KataruError(f"--seq-len {args.seq_len} exceeds the model context {hf['max_position_embeddings']}")
    task = PretrainTask(data, args.seq_len, hf, tokenizer_folder, args.eval_windows)
    common.train(args, model, task, {"name": "pretrain", "model": hf, "data": str(data), "seq_len": args.seq_len})
