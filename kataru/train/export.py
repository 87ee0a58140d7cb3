"""kataru weights <-> Hugging Face LLaMA folders, so trained models load in kataru and transformers alike."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from kataru.config import ModelConfig
from kataru.errors import KataruError
from kataru.model import Transformer

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
                   "tokenizer.model")


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
    """kataru's fused tensors split back into the published LLaMA names."""
    c = model.config
    if c.family not in ("llama", "mistral"):
        raise KataruError(f"export writes LLaMA-layout folders; a {c.family} model cannot be exported")
    state = {k: v.detach() for k, v in model.state_dict().items()}
    out: dict[str, Tensor] = {"model.embed_tokens.weight": state["tok_embeddings.weight"],
                              "model.norm.weight": state["norm.weight"]}
    for i in range(c.n_layer):
        k, p = f"layers.{i}", f"model.layers.{i}"
        q, kk, v = state[f"{k}.attention.wqkv.weight"].split([c.q_size, c.kv_size, c.kv_size])
        gate, up = state[f"{k}.feed_forward.w1.weight"].chunk(2)
        out.update({
            f"{p}.input_layernorm.weight": state[f"{k}.attention_norm.weight"],
            f"{p}.post_attention_layernorm.weight": state[f"{k}.ffn_norm.weight"],
            f"{p}.self_attn.q_proj.weight": q, f"{p}.self_attn.k_proj.weight": kk, f"{p}.self_attn.v_proj.weight": v,
            f"{p}.self_attn.o_proj.weight": state[f"{k}.attention.wo.weight"],
            f"{p}.mlp.gate_proj.weight": gate, f"{p}.mlp.up_proj.weight": up,
            f"{p}.mlp.down_proj.weight": state[f"{k}.feed_forward.w2.weight"],
        })
    if not c.tie_embeddings:
        out["lm_head.weight"] = state["output.weight"]
    return {k: (v.to(dtype) if dtype else v).contiguous().cpu() for k, v in out.items()}


def write_atomic(path: Path, data: bytes | str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as f:
        f.write(data.encode() if isinstance(data, str) else data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def save_hf(model: Transformer, hf_config: dict[str, Any], out: Path, tokenizer_folder: Path | None,
            generation: dict[str, Any] | None = None, dtype: torch.dtype | None = None) -> Path:
    """Write a complete Hugging Face folder: config, safetensors weights, tokenizer, generation config."""
    from safetensors.torch import save

    out.mkdir(parents=True, exist_ok=True)
    config = dict(hf_config)
    if dtype is not None:
        config["dtype"] = str(dtype).removeprefix("torch.")
    write_atomic(out / "model.safetensors", save(hf_state_dict(model, dtype), metadata={"format": "pt"}))
    write_atomic(out / "config.json", json.dumps(config, indent=2) + "\n")
    gen = {"bos_token_id": config.get("bos_token_id"), "eos_token_id": config.get("eos_token_id"),
           "pad_token_id": config.get("pad_token_id"), **(generation or {})}
    write_atomic(out / "generation_config.json", json.dumps(gen, indent=2) + "\n")
    if tokenizer_folder is not None and tokenizer_folder.resolve() != out.resolve():
        for name in TOKENIZER_FILES:
            if (tokenizer_folder / name).is_file():
                shutil.copyfile(tokenizer_folder / name, out / name)
    return out


def read_hf_config(folder: Path) -> tuple[dict[str, Any], ModelConfig]:
    from kataru.config import read_config_file

    hf = read_config_file(folder)
    return hf, ModelConfig.from_hf(hf)
