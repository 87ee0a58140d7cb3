"""kataru weights -> Hugging Face folders, so what kataru trains loads in kataru and transformers alike.

The export map is the loader's weight plan read backwards (`checkpoint.weight_plan`): every kataru tensor
is a stack of row ranges of published tensors, so each published tensor is put together from the kataru
rows that came from it. Every family the loader reads can therefore be written back.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from kataru.checkpoint import source_rows, weight_plan
from kataru.config import ModelConfig, read_config_file
from kataru.errors import KataruError
from kataru.files import write_atomic
from kataru.model import Transformer

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
                   "tokenizer.model", "spiece.model", "added_tokens.json")


def llama_config(vocab_size: int, dim: int, n_layer: int, n_head: int, intermediate_size: int, max_seq_len: int,
                 n_kv_head: int | None = None, tie_embeddings: bool = True, bos_token_id: int | None = 1,
                 eos_token_id: int | None = 2, pad_token_id: int | None = 3, rope_theta: float = 10000.0,
                 norm_eps: float = 1e-5) -> dict[str, Any]:
    """A transformers LlamaForCausalLM config.json for a new model."""
    if dim % n_head:
        raise KataruError(f"--dim {dim} must be a multiple of --heads {n_head}")
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": vocab_size,
        "hidden_size": dim,
        "intermediate_size": intermediate_size,
        "num_hidden_layers": n_layer,
        "num_attention_heads": n_head,
        "num_key_value_heads": n_kv_head or n_head,
        "head_dim": dim // n_head,
        "hidden_act": "silu",
        "max_position_embeddings": max_seq_len,
        "rms_norm_eps": norm_eps,
        "rope_parameters": {"rope_type": "default", "rope_theta": rope_theta},
        "rope_theta": rope_theta,
        "attention_bias": False,
        "mlp_bias": False,
        "tie_word_embeddings": tie_embeddings,
        "bos_token_id": bos_token_id,
        "eos_token_id": eos_token_id,
        "pad_token_id": pad_token_id,
        "dtype": "float32",
    }


def hf_state_dict(model: Transformer, dtype: torch.dtype | None = None) -> dict[str, Tensor]:
    """kataru's fused tensors split back into the published names of the model's family."""
    if getattr(model, "quantization", None):
        raise KataruError(f"a {model.quantization} model cannot be exported as a Hugging Face folder; export the "
                          "unquantized model (kataru quantize writes quantized folders)")
    plan = weight_plan(model.config)
    state = {k: v.detach() for k, v in model.state_dict().items()}
    parts: dict[str, list[tuple[int, Tensor]]] = {}
    for name, segments in plan.items():
        row = 0
        for source, start, end in segments:
            parts.setdefault(source, []).append((start, state[name][row:row + end - start]))
            row += end - start
    rows = source_rows(plan)
    out: dict[str, Tensor] = {}
    for source, pieces in parts.items():
        first = pieces[0][1]
        tensor = torch.empty(rows[source], *first.shape[1:], dtype=dtype or first.dtype)
        for start, piece in pieces:
            tensor[start:start + piece.shape[0]] = piece
        out[source] = tensor.contiguous().cpu()
    return out


def save_hf(model: Transformer, hf_config: dict[str, Any], out: Path, tokenizer_folder: Path | None,
            generation: dict[str, Any] | None = None, dtype: torch.dtype | None = None) -> Path:
    """Write a complete Hugging Face folder: safetensors weights, tokenizer, generation config, and config.json
    last, each file atomically: a folder killed half-written has no config.json, so it never loads as a model."""
    from safetensors.torch import save

    out.mkdir(parents=True, exist_ok=True)
    config = dict(hf_config)
    if dtype is not None:
        config["dtype"] = str(dtype).removeprefix("torch.")
    write_atomic(out / "model.safetensors", save(hf_state_dict(model, dtype), metadata={"format": "pt"}))
    gen = {"bos_token_id": config.get("bos_token_id"), "eos_token_id": config.get("eos_token_id"),
           "pad_token_id": config.get("pad_token_id"), **(generation or {})}
    write_atomic(out / "generation_config.json", json.dumps(gen, indent=2) + "\n")
    if tokenizer_folder is not None and tokenizer_folder.resolve() != out.resolve():
        for name in TOKENIZER_FILES:
            if (tokenizer_folder / name).is_file():
                write_atomic(out / name, (tokenizer_folder / name).read_bytes())
    write_atomic(out / "config.json", json.dumps(config, indent=2) + "\n")
    return out


def read_hf_config(folder: Path) -> tuple[dict[str, Any], ModelConfig]:
    hf = read_config_file(folder)
    return hf, ModelConfig.from_hf(hf)
