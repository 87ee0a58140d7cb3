"""Training subcommands of the `kataru` CLI: data, train-tokenizer, pretrain, sft, dpo, merge-lora."""

from __future__ import annotations

import argparse
import json
from dataclasses import fields
from pathlib import Path
from typing import Any

from kataru.errors import KataruError
from kataru.train.loop import TrainConfig


def _add_train_config(p: argparse.ArgumentParser, **defaults: Any) -> None:
    base = {f.name: f.default for f in fields(TrainConfig)}
    base.update(defaults)
    for name, default in base.items():
        flag = "--" + name.replace("_", "-")
        if isinstance(default, bool):
            p.add_argument(flag, action="store_true", default=default)
        else:
            p.add_argument(flag, type=type(default), default=default)
    p.add_argument("--out", required=True, help="run folder: checkpoints/, log.jsonl, loss.png, final/")
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in --out")
    p.add_argument("--no-progress", action="store_true")


def _train_config(args: argparse.Namespace) -> TrainConfig:
    return TrainConfig(**{f.name: getattr(args, f.name) for f in fields(TrainConfig)})


def add_commands(sub: argparse._SubParsersAction) -> dict[str, Any]:
    data = sub.add_parser("data", help="prepare training data: clean, tokenize, derive SFT/DPO sets")
    dsub = data.add_subparsers(dest="data_command", required=True)
    clean = dsub.add_parser("clean", help="clean (Aozora notation), deduplicate and split documents")
    clean.add_argument("inputs", nargs="+", help=".jsonl(.gz) with a text field, or .txt files")
    clean.add_argument("--out", required=True)
    clean.add_argument("--field", default="text")
    clean.add_argument("--val-fraction", type=float, default=0.01)
    clean.add_argument("--min-chars", type=int, default=200)
    clean.add_argument("--aozora", choices=["auto", "always", "never"], default="auto")
    tok = dsub.add_parser("tokenize", help="tokenize cleaned train/val JSONL into packed token files")
    tok.add_argument("folder", help="output of `kataru data clean`")
    tok.add_argument("--tokenizer", required=True, help="folder with tokenizer.json")
    tok.add_argument("--out", required=True)
    tok.add_argument("--workers", type=int)

    derive = dsub.add_parser("sft", help="derive instruction data from JGLUE train splits and Aozora works")
    derive.add_argument("--jglue", help="JGLUE datasets folder (jcommonsenseqa-v1.3/, jsts-v1.3/)")
    derive.add_argument("--aozora", help="cleaned train.jsonl from `kataru data clean`")
    derive.add_argument("--out", required=True, help="messages JSONL to write")
    derive.add_argument("--max-examples", type=int)
    derive.add_argument("--seed", type=int, default=0)
    pairs = dsub.add_parser("dpo", help="preference pairs from a model's own answers (rejection sampling)")
    pairs.add_argument("model", help="the SFT model that answers")
    pairs.add_argument("--sft-data", required=True, help="messages JSONL (e.g. from `kataru data sft`)")
    pairs.add_argument("--out", required=True)
    pairs.add_argument("--samples", type=int, default=4, help="answers sampled per prompt")
    pairs.add_argument("--max-prompts", type=int, default=500)
    pairs.add_argument("--seed", type=int, default=0)

    tt = sub.add_parser("train-tokenizer", help="train a Unigram byte-fallback tokenizer (tokenizer.json)")
    tt.add_argument("inputs", nargs="+")
    tt.add_argument("--out", required=True)
    tt.add_argument("--vocab-size", type=int, default=8000)
    tt.add_argument("--field", default="text")
    tt.add_argument("--max-lines", type=int, default=400_000)

    pre = sub.add_parser("pretrain", help="causal-LM pretraining of a new LLaMA-config model (or --init)")
    pre.add_argument("--data", required=True, help="output of `kataru data tokenize`")
    pre.add_argument("--tokenizer", help="tokenizer folder (default: the one the data was tokenized with)")
    pre.add_argument("--init", help="continue from this Hugging Face folder instead of a new model")
    pre.add_argument("--dim", type=int, default=256)
    pre.add_argument("--layers", type=int, default=6)
    pre.add_argument("--heads", type=int, default=4)
    pre.add_argument("--kv-heads", type=int)
    pre.add_argument("--intermediate", type=int, default=704)
    pre.add_argument("--seq-len", type=int, default=256)
    pre.add_argument("--context", type=int, default=1024, help="max_position_embeddings written to config.json")
    pre.add_argument("--eval-windows", type=int, default=64)
    _add_train_config(pre)

    sft = sub.add_parser("sft", help="supervised fine-tuning (full or --lora) on messages or instruction JSONL")
    sft.add_argument("model", help="Hugging Face folder to fine-tune")
    sft.add_argument("--data", required=True, help="JSONL with messages, or instruction/input/output")
    sft.add_argument("--seq-len", type=int, default=256)
    _add_lora(sft)
    _add_train_config(sft, lr=3e-4, warmup_steps=20, max_steps=300, eval_every=50, save_every=50)

    dpo = sub.add_parser("dpo", help="Direct Preference Optimization on prompt/chosen/rejected JSONL")
    dpo.add_argument("model", help="Hugging Face folder (the policy starts here and it is the reference)")
    dpo.add_argument("--data", required=True, help="JSONL with prompt, chosen, rejected")
    dpo.add_argument("--beta", type=float, default=0.1)
    dpo.add_argument("--seq-len", type=int, default=256)
    _add_lora(dpo)
    _add_train_config(dpo, lr=5e-5, warmup_steps=10, max_steps=100, batch_size=8, eval_every=25,
                      save_every=25, weight_decay=0.0)

    merge = sub.add_parser("merge-lora", help="fold a LoRA adapter into its base weights")
    merge.add_argument("base", help="the base Hugging Face folder")
    merge.add_argument("adapter", help="adapter folder (adapter_config.json + adapter_model.safetensors)")
    merge.add_argument("--out", required=True)

    ev = sub.add_parser("eval", help="Japanese evaluation: jcommonsenseqa (log-likelihood over 5 choices)")
    ev.add_argument("task", choices=["jcommonsenseqa"])
    ev.add_argument("model", nargs="?", help="model folder (default: the embedded kataru-tiny-ja)")
    ev.add_argument("--data", help="valid-v1.3.json (default: ../shared/data/jglue/...)")
    ev.add_argument("--limit", type=int)
    ev.add_argument("--json", action="store_true")
    return {"data": cmd_data, "train-tokenizer": cmd_train_tokenizer, "pretrain": cmd_pretrain, "sft": cmd_sft,
            "dpo": cmd_dpo, "merge-lora": cmd_merge_lora, "eval": cmd_eval}


def _add_lora(p: argparse.ArgumentParser) -> None:
    p.add_argument("--lora", action="store_true", help="train LoRA adapters only (merge with `kataru merge-lora`)")
    p.add_argument("--lora-r", type=int, default=8)
    p.add_argument("--lora-alpha", type=float, default=16.0)
    p.add_argument("--lora-dropout", type=float, default=0.0)
    p.add_argument("--lora-targets", default="wqkv,wo,w1,w2")


def cmd_data(args: argparse.Namespace) -> None:
    from kataru.train import data

    if args.data_command == "clean":
        stats = data.clean_corpus(args.inputs, Path(args.out), args.val_fraction, args.min_chars, args.field,
                                  args.aozora)
        print(json.dumps(vars(stats)))
    elif args.data_command == "tokenize":
        meta = data.tokenize_corpus(Path(args.folder), Path(args.tokenizer), Path(args.out), args.workers)
        print(json.dumps(meta["splits"]))
    elif args.data_command == "sft":
        from kataru.train.derive import derive_sft

        counts = derive_sft(Path(args.out), args.jglue and Path(args.jglue), args.aozora and Path(args.aozora),
                            args.seed, args.max_examples)
        print(json.dumps(counts))
    elif args.data_command == "dpo":
        from kataru.train.pairs import build_pairs

        print(json.dumps(build_pairs(Path(args.model), Path(args.sft_data), Path(args.out), args.samples,
                                     args.max_prompts, args.seed)))


def cmd_train_tokenizer(args: argparse.Namespace) -> None:
    from kataru.train.tokenizer import train_tokenizer

    print(train_tokenizer(args.inputs, Path(args.out), args.vocab_size, args.field, args.max_lines))


def _finish(trainer: Any, out: Path) -> None:
    """Copy the last checkpoint's model files to out/final (no optimizer state)."""
    import shutil

    if not trainer.dist.main:
        return
    last = trainer.latest()
    final = out / "final"
    tmp = out / ".tmp-final"
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(last, tmp, ignore=shutil.ignore_patterns("optimizer.pt", "trainer_state.json"))
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)
    print(final)


def cmd_pretrain(args: argparse.Namespace) -> None:
    from kataru.tokenizer import Tokenizer
    from kataru.train.export import llama_config
    from kataru.train.pretrain import PretrainTask, load_trainable, new_model

    data = Path(args.data)
    if not data.is_dir():
        raise KataruError(f"--data {data} does not exist; prepare it with `kataru data tokenize`")
    meta_path = data / "meta.json"
    try:
        data_meta = json.loads(meta_path.read_text()) if meta_path.is_file() else {}
    except json.JSONDecodeError as err:
        raise KataruError(f"{meta_path} is malformed ({err}); prepare the data again") from None
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
    _run(args, model, task, {"name": "pretrain", "model": hf, "data": str(data), "seq_len": args.seq_len})


def _policy(args: argparse.Namespace) -> tuple[dict[str, Any], Any, Any]:
    """(hf config, trainable model, weights saver) for fine-tuning args.model, full or LoRA."""
    from kataru.train.pretrain import FullWeights, load_trainable
    from kataru.train.sft import AdapterWeights

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


def _run(args: argparse.Namespace, model: Any, task: Any, meta: dict[str, Any]) -> None:
    from kataru.train.loop import Trainer

    out = Path(args.out)
    trainer = Trainer(model, task, _train_config(args), out, meta, progress=not args.no_progress)
    if args.resume:
        trainer.resume()
    elif trainer.latest() is not None:
        raise KataruError(f"{out} already holds checkpoints; pass --resume to continue or choose a new --out")
    trainer.run()
    _finish(trainer, out)


def _style_and_tokenizer(folder: Path) -> tuple[Any, Any]:
    from kataru.config import ModelConfig, read_config_file
    from kataru.prompts import detect_style
    from kataru.tokenizer import Tokenizer

    tokenizer = Tokenizer(folder)
    return detect_style(ModelConfig.from_hf(read_config_file(folder)).family, tokenizer), tokenizer


def cmd_sft(args: argparse.Namespace) -> None:
    from kataru.train.sft import SFTTask, read_jsonl

    rows = read_jsonl(Path(args.data))
    hf, model, weights = _policy(args)
    style, tokenizer = _style_and_tokenizer(Path(args.model))
    task = SFTTask(rows, style, tokenizer, args.seq_len, weights)
    meta = {"name": "sft" + (" (LoRA)" if args.lora else ""), "model": hf, "data": args.data,
            "lora": getattr(weights, "config", None), "skipped": task.skipped}
    _run(args, model, task, meta)


def cmd_dpo(args: argparse.Namespace) -> None:
    from kataru.train.dpo import DPOTask
    from kataru.train.pretrain import load_trainable
    from kataru.train.sft import read_jsonl

    rows = read_jsonl(Path(args.data))
    hf, model, weights = _policy(args)
    _, reference = load_trainable(Path(args.model))
    style, tokenizer = _style_and_tokenizer(Path(args.model))
    task = DPOTask(rows, style, tokenizer, args.seq_len, reference.requires_grad_(False), args.beta, weights)
    del reference
    meta = {"name": "dpo", "model": hf, "data": args.data, "beta": args.beta, "lora": getattr(weights, "config", None)}
    _run(args, model, task, meta)


def cmd_merge_lora(args: argparse.Namespace) -> None:
    from kataru.train.export import save_hf
    from kataru.train.lora import apply_lora, load_adapter, merge_lora, read_adapter_config
    from kataru.train.pretrain import GENERATION, load_trainable

    base, adapter = Path(args.base), Path(args.adapter)
    config = read_adapter_config(adapter)
    hf, model = load_trainable(base)
    apply_lora(model, config["r"], config["alpha"], 0.0, tuple(config["targets"]))
    load_adapter(model, adapter)
    merge_lora(model)
    print(save_hf(model, hf, Path(args.out), base, GENERATION))


def cmd_eval(args: argparse.Namespace) -> None:
    from kataru.eval.jcommonsenseqa import evaluate
    from kataru.llm import load

    llm = load(args.model)
    data = Path(args.data) if args.data else shared_data() / "jglue" / "jcommonsenseqa-v1.3" / "valid-v1.3.json"
    result = evaluate(llm, data, args.limit)
    print(json.dumps(result) if args.json else
          f"JCommonsenseQA: acc {result['acc']:.3f}, acc_norm {result['acc_norm']:.3f} "
          f"over {result['questions']} questions (random 0.200)")


def shared_data() -> Path:
    """../shared/data next to the working directory or the repository, where this workplace keeps it."""
    for root in (Path.cwd(), Path(__file__).resolve().parents[2]):
        candidate = root.parent / "shared" / "data"
        if candidate.is_dir():
            return candidate
    raise KataruError("no ../shared/data found; pass --data")
