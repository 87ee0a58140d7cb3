"""`kataru merge-lora`: fold a LoRA adapter into its base weights, as a new Hugging Face folder."""

from __future__ import annotations

import argparse


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("base", help="the base Hugging Face folder")
    p.add_argument("adapter", help="adapter folder (adapter_config.json + adapter_model.safetensors)")
    p.add_argument("--out", required=True, help="folder to write")


def run(args: argparse.Namespace) -> None:
    from pathlib import Path

    from kataru.train.export import save_hf
    from kataru.train.lora import apply_lora, load_adapter, merge_lora, read_adapter_config
    from kataru.train.weights import GENERATION, load_trainable

    base, adapter = Path(args.base), Path(args.adapter)
    config = read_adapter_config(adapter)
    hf, model = load_trainable(base)
    apply_lora(model, config["r"], config["alpha"], 0.0, tuple(config["targets"]))
    load_adapter(model, adapter)
    merge_lora(model)
    print(save_hf(model, hf, Path(args.out), base, GENERATION))
