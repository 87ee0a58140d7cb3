"""Direct Preference Optimization against a frozen reference model.

loss = -log σ(β · [(log π(chosen) - log π_ref(chosen)) - (log π(rejected) - log π_ref(rejected))])
with log-probabilities summed over the answer tokens. The reference model's log-probabilities are
computed once before training (it is frozen, so they never change), which halves the work per step.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kataru.errors import KataruError
from kataru.prompts import PromptStyle
from kataru.scoring import IGNORE, answer_logps, encode_answer, pad_batch
from kataru.tokenizer import Tokenizer
from kataru.train.sft import encode_conversation


def dpo_loss(policy_chosen: Tensor, policy_rejected: Tensor, ref_chosen: Tensor, ref_rejected: Tensor,
             beta: float) -> tuple[Tensor, Tensor]:
    """(mean loss, per-pair reward margin) from summed answer log-probabilities."""
    margin = beta * ((policy_chosen - ref_chosen) - (policy_rejected - ref_rejected))
    return -F.logsigmoid(margin).mean(), margin


def encode_pair(row: dict[str, Any], style: PromptStyle, tokenizer: Tokenizer, max_len: int):  # type: ignore[no-untyped-def]
    where = row.get("_where", "pair")
    prompt = row.get("prompt")
    if not isinstance(prompt, (str, list)) or not isinstance(row.get("chosen"), str) \
            or not isinstance(row.get("rejected"), str):
        raise KataruError(f"{where}: a preference pair needs prompt (text or messages), chosen and rejected")
    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
    ids = encode_conversation(style, tokenizer, messages)
    if len(ids) >= max_len:
        return None
    out = []
    for key in ("chosen", "rejected"):
        answer = encode_answer(tokenizer, row[key])
        out.append(((ids + answer)[:max_len + 1], ([IGNORE] * len(ids) + answer)[:max_len + 1]))
    return out


class DPOTask:
    def __init__(self, rows: list[dict[str, Any]], style: PromptStyle, tokenizer: Tokenizer, max_len: int,
                 reference: nn.Module, beta: float, weights: Any, val_fraction: float = 0.05) -> None:
        if beta <= 0:
            raise KataruError(f"--beta must be positive, got {beta}")
        pairs = [p for p in (encode_pair(r, style, tokenizer, max_len) for r in rows) if p is not None]
        if not pairs:
            raise KataruError(f"no preference pair fits in --seq-len {max_len} tokens")
        self.pad_id = tokenizer.pad_id if tokenizer.pad_id is not None else (tokenizer.eos_id or 0)
        self.beta, self.weights = beta, weights
        reference.eval()
        with torch.no_grad():
            self.ref = [self._logps(reference, pairs[i:i + 8], torch.device("cpu")) for i in range(0, len(pairs), 8)]
        ref_chosen = torch.cat([c for c, _ in self.ref])
        ref_rejected = torch.cat([r for _, r in self.ref])
        self.ref_chosen, self.ref_rejected = ref_chosen, ref_rejected
        n_val = min(int(len(pairs) * val_fraction), 100) if len(pairs) >= 20 else 0
        self.val_ids, self.train_ids = list(range(n_val)), list(range(n_val, len(pairs)))
        self.pairs = pairs
        self.num_samples = len(self.train_ids)

    def _logps(self, model: nn.Module, pairs: list, device: torch.device) -> tuple[Tensor, Tensor]:
        batch = pad_batch([p[0] for p in pairs] + [p[1] for p in pairs], self.pad_id, device)
        logps = answer_logps(model, batch)
        return logps[:len(pairs)], logps[len(pairs):]

    def batch(self, indices: list[int], device: torch.device) -> dict[str, Tensor]:
        return self.batch_of([self.train_ids[i] for i in indices], device)

    def loss(self, model: nn.Module, batch: dict[str, Tensor]) -> tuple[Tensor, dict[str, float]]:
        logps = answer_logps(model, batch)
        n = batch["ref_chosen"].shape[0]
        loss, margin = dpo_loss(logps[:n], logps[n:], batch["ref_chosen"], batch["ref_rejected"], self.beta)
        margin = margin.detach()
        return loss, {"reward_margin": float(margin.mean()), "reward_accuracy": float((margin > 0).float().mean())}

    def evaluate(self, model: nn.Module, device: torch.device) -> dict[str, float]:
        if not self.val_ids:
            return {}
        batch = self.batch_of(self.val_ids, device)
        loss, metrics = self.loss(model, batch)
        return {"val_loss": float(loss), **{f"val_{k}": v for k, v in metrics.items()}}

    def batch_of(self, ids: list[int], device: torch.device) -> dict[str, Tensor]:
        batch = pad_batch([self.pairs[i][0] for i in ids] + [self.pairs[i][1] for i in ids], self.pad_id, device)
        batch["ref_chosen"] = self.ref_chosen[ids].to(device)
        batch["ref_rejected"] = self.ref_rejected[ids].to(device)
        return batch

    def save(self, model: nn.Module, folder: Path) -> None:
        self.weights.save(model, folder)

    def load(self, model: nn.Module, folder: Path) -> None:
        self.weights.load(model, folder)
