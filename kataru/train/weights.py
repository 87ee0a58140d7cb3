"""What a training run starts from and saves: a Hugging Face folder as a trainable float32 kataru model, and
the two ways a checkpoint holds weights (the whole model as a Hugging Face folder, or a LoRA adapter)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from kataru.cards import LLM_JP_SAMPLING
from kataru.checkpoint import load_weights
from kataru.errors import KataruError
from kataru.model import Transformer
from kataru.train.export import read_hf_config, save_hf
from kataru.train.lora import load_adapter, read_adapter_config, save_adapter

# generation_config.json of models kataru trains: the llm-jp card's sampling, since they use its prompt style.
GENERATION = LLM_JP_SAMPLING


def load_trainable(folder: Path) -> tuple[dict[str, Any], Transformer]:
    """A Hugging Face folder as a float32 kataru model with gradients enabled."""
    hf, config = read_hf_config(folder)
    model = load_weights(folder, config, torch.float32, "cpu", progress=False)
    return hf, model.requires_grad_(True)


class FullWeights:
    """Checkpoints hold the whole model as a Hugging Face folder (the checkpoint *is* an export)."""

    def __init__(self, hf_config: dict[str, Any], tokenizer: Path) -> None:
        self.hf_config, self.tokenizer = hf_config, tokenizer

    def save(self, model: nn.Module, folder: Path) -> None:
        save_hf(model, self.hf_config, folder, self.tokenizer, GENERATION)  # type: ignore[arg-type]

    def load(self, model: nn.Module, folder: Path) -> None:
        hf, config = read_hf_config(folder)
        if hf != self.hf_config:
            raise KataruError(f"checkpoint {folder} was trained with another model config; "
                              "resume with the same settings or start a new --out folder")
        saved = load_weights(folder, config, torch.float32, "cpu", progress=False)
        with torch.no_grad():
            for target, source in zip(model.parameters(), saved.parameters(), strict=True):
                target.copy_(source)


class AdapterWeights:
    """Checkpoints of a LoRA run hold only the adapter (and its config, naming the base)."""

    def __init__(self, config: dict[str, Any]) -> None:
        self.config = config

    def save(self, model: nn.Module, folder: Path) -> None:
        save_adapter(model, self.config, folder)

    def load(self, model: nn.Module, folder: Path) -> None:
        saved = read_adapter_config(folder)
        keys = ("r", "alpha", "targets")
        if {k: saved.get(k) for k in keys} != {k: self.config[k] for k in keys}:
            raise KataruError(f"adapter in {folder} has another LoRA config; resume with the same --lora-* flags")
        load_adapter(model, folder)
