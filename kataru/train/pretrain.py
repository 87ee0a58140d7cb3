"""Causal-LM pretraining of kataru's Transformer on packed token files."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kataru.config import ModelConfig
from kataru.data.corpus import load_tokens
from kataru.errors import KataruError
from kataru.files import read_json
from kataru.model import Transformer
from kataru.train.weights import FullWeights


def init_weights(model: Transformer, std: float = 0.02) -> None:
    """GPT-2 style: normal(0, std) everywhere, residual projections scaled by 1/sqrt(2·layers)."""
    residual_std = std / (2 * model.config.n_layer) ** 0.5
    for name, p in model.named_parameters():
        if p.dim() < 2:
            nn.init.ones_(p) if name.endswith("norm.weight") else nn.init.zeros_(p)
        elif name.endswith(("wo.weight", "w2.weight")):
            nn.init.normal_(p, 0.0, residual_std)
        else:
            nn.init.normal_(p, 0.0, std)


def new_model(hf_config: dict[str, Any], seed: int) -> Transformer:
    torch.manual_seed(seed)
    model = Transformer(ModelConfig.from_hf(hf_config))
    init_weights(model)
    return model


class PretrainTask(FullWeights):
    """Windows of seq_len+1 tokens cut from the packed training stream; loss on every next token."""

    def __init__(self, data: Path, seq_len: int, hf_config: dict[str, Any], tokenizer: Path,
                 eval_windows: int = 64) -> None:
        super().__init__(hf_config, tokenizer)
        meta = read_json(data / "meta.json", "prepare the data again with `kataru data tokenize`", default={})
        self.train, self.val = load_tokens(data, "train"), load_tokens(data, "val")
        if meta.get("vocab_size", 0) > hf_config["vocab_size"]:
            raise KataruError(f"{data} was tokenized with {meta['vocab_size']} tokens but the model has "
                              f"{hf_config['vocab_size']}; tokenize with the model's tokenizer")
        self.seq_len = seq_len
        self.num_samples = (len(self.train) - 1) // seq_len
        if self.num_samples < 1:
            raise KataruError(f"{data}/train.bin holds {len(self.train)} tokens, fewer than one "
                              f"{seq_len + 1}-token window; give more text or a smaller --seq-len")
        self.eval_windows = min(eval_windows, max(1, (len(self.val) - 1) // seq_len))

    def windows(self, tokens: np.ndarray, indices: list[int], device: torch.device) -> dict[str, Tensor]:
        t = self.seq_len
        rows = np.stack([np.asarray(tokens[i * t:i * t + t + 1], dtype=np.int64) for i in indices])
        x = torch.from_numpy(rows).to(device)
        return {"inputs": x[:, :-1], "targets": x[:, 1:], "tokens": torch.tensor(x.shape[0] * t)}

    def batch(self, indices: list[int], device: torch.device) -> dict[str, Tensor]:
        return self.windows(self.train, indices, device)

    def loss(self, model: nn.Module, batch: dict[str, Tensor]) -> tuple[Tensor, dict[str, float]]:
        logits = model(batch["inputs"])
        return F.cross_entropy(logits.flatten(0, 1).float(), batch["targets"].flatten()), {}

    def evaluate(self, model: nn.Module, device: torch.device) -> dict[str, float]:
        if len(self.val) < self.seq_len + 1:
            return {}
        losses = []
        for start in range(0, self.eval_windows, 8):
            batch = self.windows(self.val, list(range(start, min(start + 8, self.eval_windows))), device)
            logits = model(batch["inputs"])
            losses.append(F.cross_entropy(logits.flatten(0, 1).float(), batch["targets"].flatten(),
                                          reduction="sum").item())
        loss = sum(losses) / (self.eval_windows * self.seq_len)
        return {"val_loss": loss, "val_ppl": float(np.exp(loss))}
