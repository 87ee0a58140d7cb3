"""One model config for every family: the differences between families are fields, not classes.

`ModelConfig.from_hf` reads a checkpoint's config.json (transformers v4 and v5 spellings) and says which
weight layout the checkpoint uses; `checkpoint.py` converts that layout to kataru's own.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from kataru.errors import KataruError
from kataru.files import read_json

Family = Literal["llama", "mistral", "stablelm", "gpt_neox", "japanese_stablelm_alpha"]

# model_type (or architectures[0]) -> family; stablelm_epoch is the old remote-code name of stablelm.
MODEL_TYPES: dict[str, Family] = {
    "llama": "llama",
    "mistral": "mistral",
    "stablelm": "stablelm",
    "stablelm_epoch": "stablelm",
    "gpt_neox": "gpt_neox",
    "japanese_stablelm_alpha": "japanese_stablelm_alpha",
}
ARCHITECTURES: dict[str, Family] = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "StableLmForCausalLM": "stablelm",
    "StableLMEpochForCausalLM": "stablelm",
    "GPTNeoXForCausalLM": "gpt_neox",
    "JapaneseStableLMAlphaForCausalLM": "japanese_stablelm_alpha",
}


# kataru's field -> the config.json field it usually comes from (for messages about a bad value)
HF_NAMES = {"dim": "hidden_size", "n_layer": "num_hidden_layers", "n_head": "num_attention_heads",
            "n_kv_head": "num_key_value_heads", "max_seq_len": "max_position_embeddings", "head_dim": "head_dim",
            "norm_eps": "rms_norm_eps / layer_norm_eps", "rope_theta": "rope_theta"}


@dataclass
class ModelConfig:
    family: Family
    vocab_size: int
    dim: int
    n_layer: int
    n_head: int
    n_kv_head: int
    head_dim: int
    intermediate_size: int
    max_seq_len: int
    norm: Literal["rmsnorm", "layernorm"] = "rmsnorm"
    norm_eps: float = 1e-5
    norm_bias: bool = False
    attn_norm_affine: bool = True  # Alpha: the pre-attention LayerNorm has no weight and no bias
    rotary_dim: int = 0  # leading dims of each head that get rotary (rotate-half layout)
    rope_theta: float = 10000.0
    xpos_scale_base: float | None = None  # Alpha's xPos; None for plain rotary
    parallel_residual: bool = False  # x + attn(ln1 x) + mlp(ln2 x)
    mlp: Literal["swiglu", "gelu"] = "swiglu"
    activation: str = "silu"
    mlp_bias: bool = False
    qkv_bias: bool = False
    o_bias: bool = False
    sliding_window: int | None = None
    tie_embeddings: bool = False
    bos_token_id: int | None = None
    eos_token_ids: list[int] = field(default_factory=list)
    pad_token_id: int | None = None
    torch_dtype: str | None = None  # what the checkpoint says it was saved in

    @property
    def q_size(self) -> int:
        return self.n_head * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.n_kv_head * self.head_dim

    def num_parameters(self) -> int:
        d, i, v = self.dim, self.intermediate_size, self.vocab_size
        attn = d * (self.q_size + 2 * self.kv_size) + self.q_size * d
        attn += (self.q_size + 2 * self.kv_size) * self.qkv_bias + d * self.o_bias
        mlp = d * i * (3 if self.mlp == "swiglu" else 2) + (i + d) * self.mlp_bias
        norm_params = d * (1 + self.norm_bias)
        norms = norm_params * (1 + (1 if self.attn_norm_affine else 0))
        per_layer = attn + mlp + norms
        embeddings = v * d * (1 if self.tie_embeddings else 2)
        return self.n_layer * per_layer + embeddings + norm_params

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_hf(cls, hf: dict[str, Any]) -> ModelConfig:
        if not isinstance(hf, dict):
            raise KataruError("config.json must hold a JSON object; restore the file from the checkpoint")
        family = detect_family(hf)
        try:
            config = _BUILDERS[family](hf)
        except KeyError as missing:
            raise KataruError(
                f"config.json lacks the field {missing} that a {family} checkpoint needs; "
                "re-export the config with transformers"
            ) from None
        except (TypeError, ValueError, ZeroDivisionError, AttributeError) as err:
            raise KataruError(f"config.json has a field of the wrong type or value ({err}); restore the file "
                              "from the checkpoint") from None
        return config.check()

    def check(self) -> ModelConfig:
        """Refuse, in one line, a config whose sizes no model can have (negative, zero, not whole numbers)."""
        def whole(name: str, value: Any, low: int = 1) -> None:
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise KataruError(f"config.json gives {HF_NAMES.get(name, name)} = {value!r}; it must be a whole "
                                  f"number of at least {low}; restore the file from the checkpoint")

        for name in ("vocab_size", "dim", "n_layer", "n_head", "n_kv_head", "head_dim", "intermediate_size",
                     "max_seq_len"):
            whole(name, getattr(self, name))
        if self.n_head % self.n_kv_head:
            raise KataruError(f"config.json gives {self.n_head} attention heads and {self.n_kv_head} key/value "
                              "heads; the first must be a multiple of the second")
        if not 0 <= self.rotary_dim <= self.head_dim or self.rotary_dim % 2:
            raise KataruError(f"config.json's rotary fraction gives {self.rotary_dim} rotary dims of a "
                              f"{self.head_dim}-dim head; it must be an even number within the head")
        for name in ("norm_eps", "rope_theta"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
                raise KataruError(f"config.json gives {HF_NAMES[name]} = {value!r}; it must be a positive number")
        if self.sliding_window is not None:
            whole("sliding_window", self.sliding_window)
        for token in self.eos_token_ids:
            whole("eos_token_id", token, low=0)
        return self


def detect_family(hf: dict[str, Any]) -> Family:
    model_type = hf.get("model_type")
    if model_type in MODEL_TYPES:
        return MODEL_TYPES[model_type]
    for arch in hf.get("architectures") or []:
        if arch in ARCHITECTURES:
            return ARCHITECTURES[arch]
    known = ", ".join(sorted(MODEL_TYPES))
    raise KataruError(
        f"unknown architecture (model_type={model_type!r}, architectures={hf.get('architectures')}); "
        f"kataru runs model types: {known}"
    )


def read_config_file(folder: Path) -> dict[str, Any]:
    path = folder / "config.json"
    if not path.is_file():
        raise KataruError(f"no config.json in {folder}; a model folder is a Hugging Face checkpoint folder")
    return read_json(path, "restore the file from the checkpoint")


def _rope(hf: dict[str, Any]) -> dict[str, Any]:
    """Rotary settings from v5's `rope_parameters` or the older top-level fields."""
    params = dict(hf.get("rope_scaling") or {})
    params.update(hf.get("rope_parameters") or {})
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type not in ("default", None):
        raise KataruError(f"rope scaling type {rope_type!r} is not supported yet; only plain rotary is")
    theta = params.get("rope_theta", hf.get("rope_theta", hf.get("rotary_emb_base", 10000.0)))
    fraction = params.get("partial_rotary_factor",
                          hf.get("partial_rotary_factor", hf.get("rotary_pct", hf.get("rope_pct", 1.0))))
    return {"rope_theta": float(theta), "fraction": float(fraction)}


def _eos_ids(hf: dict[str, Any]) -> list[int]:
    eos = hf.get("eos_token_id")
    if eos is None:
        return []
    return list(eos) if isinstance(eos, list) else [int(eos)]


def _common(hf: dict[str, Any], family: Family, head_dim: int, rope: dict[str, Any]) -> dict[str, Any]:
    return {
        "family": family,
        "vocab_size": hf["vocab_size"],
        "dim": hf["hidden_size"],
        "n_layer": hf["num_hidden_layers"],
        "n_head": hf["num_attention_heads"],
        "head_dim": head_dim,
        "max_seq_len": hf.get("max_position_embeddings", 2048),
        "rope_theta": rope["rope_theta"],
        "rotary_dim": int(head_dim * rope["fraction"]),
        "tie_embeddings": bool(hf.get("tie_word_embeddings", False)),
        "bos_token_id": hf.get("bos_token_id"),
        "eos_token_ids": _eos_ids(hf),
        "pad_token_id": hf.get("pad_token_id"),
        "torch_dtype": hf.get("dtype", hf.get("torch_dtype")),
    }


def _llama(hf: dict[str, Any], family: Family = "llama") -> ModelConfig:
    head_dim = hf.get("head_dim") or hf["hidden_size"] // hf["num_attention_heads"]
    if hf.get("hidden_act", "silu") != "silu":
        raise KataruError(f"hidden_act {hf['hidden_act']!r} is not supported for {family}; expected silu")
    window = hf.get("sliding_window") if hf.get("use_sliding_window", True) else None
    return ModelConfig(
        **_common(hf, family, head_dim, _rope(hf)),
        n_kv_head=hf.get("num_key_value_heads") or hf["num_attention_heads"],
        intermediate_size=hf["intermediate_size"],
        norm="rmsnorm",
        norm_eps=hf.get("rms_norm_eps", 1e-6),
        qkv_bias=bool(hf.get("attention_bias", False)),
        o_bias=bool(hf.get("attention_bias", False)),
        mlp_bias=bool(hf.get("mlp_bias", False)),
        sliding_window=window if family == "mistral" else None,
    )


def _stablelm(hf: dict[str, Any]) -> ModelConfig:
    if hf.get("qk_layernorm") or hf.get("use_parallel_residual"):
        raise KataruError("StableLM with qk_layernorm or parallel residual is not supported yet "
                          "(Japanese StableLM 3B-4E1T uses neither)")
    head_dim = hf["hidden_size"] // hf["num_attention_heads"]
    return ModelConfig(
        **_common(hf, "stablelm", head_dim, _rope(hf)),
        n_kv_head=hf.get("num_key_value_heads") or hf["num_attention_heads"],
        intermediate_size=hf["intermediate_size"],
        norm="layernorm",
        norm_bias=True,
        norm_eps=hf.get("layer_norm_eps", hf.get("norm_eps", 1e-5)),
        qkv_bias=bool(hf.get("use_qkv_bias", False)),
    )


def _gpt_neox(hf: dict[str, Any]) -> ModelConfig:
    head_dim = hf["hidden_size"] // hf["num_attention_heads"]
    bias = bool(hf.get("attention_bias", True))
    return ModelConfig(
        **_common(hf, "gpt_neox", head_dim, _rope(hf)),
        n_kv_head=hf["num_attention_heads"],
        intermediate_size=hf.get("intermediate_size") or 4 * hf["hidden_size"],
        norm="layernorm",
        norm_bias=True,
        norm_eps=hf.get("layer_norm_eps", 1e-5),
        qkv_bias=bias,
        o_bias=bias,
        mlp="gelu",
        activation=hf.get("hidden_act", "gelu"),
        mlp_bias=True,
        parallel_residual=bool(hf.get("use_parallel_residual", True)),
    )


def _alpha(hf: dict[str, Any]) -> ModelConfig:
    dim = hf["hidden_size"]
    head_dim = dim // hf["num_attention_heads"]
    hf = {"max_position_embeddings": 2048, "bos_token_id": 3, "eos_token_id": 3, **hf}
    rope = {"rope_theta": float(hf.get("rotary_emb_base", 10000)), "fraction": float(hf.get("rotary_pct", 0.25))}
    return ModelConfig(
        **_common(hf, "japanese_stablelm_alpha", head_dim, rope),
        n_kv_head=hf["num_attention_heads"],
        intermediate_size=256 * math.ceil(int(8 * dim / 3) / 256),
        norm="layernorm",
        norm_bias=True,
        norm_eps=hf.get("layer_norm_eps", 1e-5),
        attn_norm_affine=False,
        xpos_scale_base=float(hf.get("rotary_scale_base", 512)),
        parallel_residual=bool(hf.get("use_parallel_residual", True)),
    )


_BUILDERS = {
    "llama": _llama,
    "mistral": lambda hf: _llama(hf, "mistral"),
    "stablelm": _stablelm,
    "gpt_neox": _gpt_neox,
    "japanese_stablelm_alpha": _alpha,
}
