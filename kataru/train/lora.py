"""LoRA: low-rank adapters on kataru's fused projections, and folding them back into the weights.

A small module rather than peft: kataru's projections are fused (one qkv, one gate+up matrix), and an
adapter on the fused matrix is exactly one adapter per published matrix stacked, so four targets cover
the whole block and `merge_lora` is one matmul per target.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from kataru.errors import KataruError
from kataru.files import read_json, write_atomic
from kataru.model import Linear, Transformer

TARGETS = ("wqkv", "wo", "w1", "w2")
ADAPTER_WEIGHTS, ADAPTER_CONFIG = "adapter_model.safetensors", "adapter_config.json"


class LoRALinear(nn.Module):
    """y = base(x) + scale · B(A(dropout(x))), with the base frozen and B starting at zero."""

    def __init__(self, base: nn.Linear, r: int, alpha: float, dropout: float = 0.0) -> None:
        super().__init__()
        self.base = base.requires_grad_(False)
        self.scale = alpha / r
        self.lora_a = nn.Parameter(torch.empty(r, base.in_features, dtype=base.weight.dtype))
        self.lora_b = nn.Parameter(torch.zeros(base.out_features, r, dtype=base.weight.dtype))
        nn.init.kaiming_uniform_(self.lora_a, a=math.sqrt(5))
        self.dropout = nn.Dropout(dropout) if dropout else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        return self.base(x) + (self.dropout(x) @ self.lora_a.T @ self.lora_b.T) * self.scale

    def merged(self) -> Linear:
        layer = Linear(self.base.in_features, self.base.out_features, bias=self.base.bias is not None)
        with torch.no_grad():
            layer.weight.copy_(self.base.weight + self.scale * (self.lora_b @ self.lora_a))
            if self.base.bias is not None:
                layer.bias.copy_(self.base.bias)
        return layer


def _targets(model: Transformer, targets: tuple[str, ...]) -> list[tuple[nn.Module, str]]:
    unknown = set(targets) - set(TARGETS)
    if unknown:
        raise KataruError(f"unknown LoRA targets {sorted(unknown)}; choose from {', '.join(TARGETS)}")
    found = []
    for layer in model.layers:
        for parent in (layer.attention, layer.feed_forward):
            found += [(parent, name) for name in targets if hasattr(parent, name)]
    return found


def apply_lora(model: Transformer, r: int = 8, alpha: float = 16.0, dropout: float = 0.0,
               targets: tuple[str, ...] = TARGETS) -> dict[str, Any]:
    """Freeze the model and wrap the target projections; returns the adapter config."""
    if r < 1:
        raise KataruError(f"--lora-r must be at least 1, got {r}")
    model.requires_grad_(False)
    for parent, name in _targets(model, targets):
        setattr(parent, name, LoRALinear(getattr(parent, name), r, alpha, dropout))
    return {"r": r, "alpha": alpha, "dropout": dropout, "targets": list(targets)}


def adapter_state(model: nn.Module) -> dict[str, Tensor]:
    return {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items() if ".lora_" in k}


def save_adapter(model: nn.Module, config: dict[str, Any], folder: Path) -> None:
    from safetensors.torch import save

    folder.mkdir(parents=True, exist_ok=True)
    write_atomic(folder / ADAPTER_WEIGHTS, save(adapter_state(model)))
    write_atomic(folder / ADAPTER_CONFIG, json.dumps(config, ensure_ascii=False, indent=2) + "\n")


def read_adapter_config(folder: Path) -> dict[str, Any]:
    path = folder / ADAPTER_CONFIG
    if not path.is_file() or not (folder / ADAPTER_WEIGHTS).is_file():
        raise KataruError(f"{folder} is not a LoRA adapter folder ({ADAPTER_CONFIG} + {ADAPTER_WEIGHTS})")
    return read_json(path, "train the adapter again")


def load_adapter(model: nn.Module, folder: Path) -> None:
    from safetensors.torch import load_file

    weights = load_file(folder / ADAPTER_WEIGHTS)
    expected = adapter_state(model)
    if set(weights) != set(expected) or any(weights[k].shape != expected[k].shape for k in weights):
        raise KataruError(f"the adapter in {folder} does not fit this model (other rank, targets or base config)")
    model.load_state_dict(weights, strict=False)


def merge_lora(model: Transformer) -> Transformer:
    """Fold every adapter into its base weight, leaving a plain kataru model."""
    for layer in model.layers:
        for parent in (layer.attention, layer.feed_forward):
            for name, child in list(parent.named_children()):
                if isinstance(child, LoRALinear):
                    setattr(parent, name, child.merged())
    return model
