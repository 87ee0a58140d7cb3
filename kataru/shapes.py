"""The seed models' shapes with random weights: what benchmarks and experiments run when no checkpoint is at
hand (weights cannot be downloaded here). `build_shape` can also build the transformers model of the same
shape and hand its very tensors to kataru, so both run the same weights.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from kataru.checkpoint import load_weights
from kataru.config import ModelConfig
from kataru.errors import KataruError
from kataru.model import Rotary, Transformer

# config.json values of the real checkpoints (architectures.md; intermediate sizes and dtypes as published).
SHAPES: dict[str, dict[str, Any]] = {
    "llm-jp-3.1-1.8b": {"model_type": "llama", "vocab_size": 99584, "hidden_size": 2048, "num_hidden_layers": 24,
                        "num_attention_heads": 16, "num_key_value_heads": 16, "intermediate_size": 7168,
                        "max_position_embeddings": 4096, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
                        "torch_dtype": "bfloat16"},
    "rinna-3.6b": {"model_type": "gpt_neox", "vocab_size": 32000, "hidden_size": 2816, "num_hidden_layers": 36,
                   "num_attention_heads": 22, "intermediate_size": 11264, "max_position_embeddings": 2048,
                   "rotary_pct": 1.0, "use_parallel_residual": False, "hidden_act": "gelu",
                   "torch_dtype": "float16"},
    "jslm-3b-4e1t": {"model_type": "stablelm", "vocab_size": 50304, "hidden_size": 2560, "num_hidden_layers": 32,
                     "num_attention_heads": 32, "num_key_value_heads": 32, "intermediate_size": 6912,
                     "max_position_embeddings": 4096, "partial_rotary_factor": 0.25, "layer_norm_eps": 1e-5,
                     "torch_dtype": "bfloat16"},
    "gamma-7b": {"model_type": "mistral", "vocab_size": 32000, "hidden_size": 4096, "num_hidden_layers": 32,
                 "num_attention_heads": 32, "num_key_value_heads": 8, "intermediate_size": 14336,
                 "max_position_embeddings": 32768, "sliding_window": 4096, "rms_norm_eps": 1e-5,
                 "torch_dtype": "bfloat16"},
    "alpha-7b": {"model_type": "japanese_stablelm_alpha", "vocab_size": 65536, "hidden_size": 4096,
                 "num_hidden_layers": 32, "num_attention_heads": 32, "max_position_embeddings": 2048,
                 "rotary_pct": 0.25, "rotary_scale_base": 512, "torch_dtype": "float32"},
    # A few-MB model for CI and smoke tests.
    "tiny": {"model_type": "llama", "vocab_size": 1024, "hidden_size": 128, "num_hidden_layers": 2,
             "num_attention_heads": 4, "num_key_value_heads": 2, "intermediate_size": 320,
             "max_position_embeddings": 1024, "rms_norm_eps": 1e-5, "torch_dtype": "bfloat16"},
}
# The transformers class of each family transformers runs itself (Alpha's code is remote code upstream).
HF_CLASSES = {"llama": "LlamaForCausalLM", "gpt_neox": "GPTNeoXForCausalLM", "stablelm": "StableLmForCausalLM",
              "mistral": "MistralForCausalLM"}


def shape_config(name: str, layers: int | None = None) -> dict[str, Any]:
    """The config.json of a seed shape, optionally with fewer layers."""
    if name not in SHAPES:
        raise KataruError(f"unknown shape {name!r}; choose one of {', '.join(SHAPES)} or give a model folder")
    hf_config = dict(SHAPES[name])
    if layers:
        hf_config["num_hidden_layers"] = layers
    return hf_config


def build_shape(name: str, layers: int | None, dtype: torch.dtype,
                with_reference: bool = False) -> tuple[Transformer, torch.nn.Module | None]:
    """(kataru model, the transformers model or None) sharing the same random weights (seed 0)."""
    hf_config = shape_config(name, layers)
    config = ModelConfig.from_hf(hf_config)
    torch.manual_seed(0)
    if not (with_reference and config.family in HF_CLASSES):
        return random_model(config, dtype), None
    import transformers

    cls = getattr(transformers, HF_CLASSES[config.family])
    hf = cls.config_class(**{k: v for k, v in hf_config.items() if k != "model_type"})
    with torch.device("meta"):
        reference = cls(hf)
    reference = reference.to_empty(device="cpu").to(dtype)
    with torch.no_grad():
        for p in reference.parameters():
            p.normal_(0, 0.02)
    # to_empty leaves buffers uninitialised: rebuild the rotary tables (the only buffers) properly.
    for module_name, module in list(reference.named_modules()):
        if type(module).__name__.endswith("RotaryEmbedding"):
            parent, _, child = module_name.rpartition(".")
            setattr(reference.get_submodule(parent) if parent else reference, child, type(module)(config=hf))
    assert not [n for n, _ in reference.named_buffers() if "rotary" not in n], "unexpected buffers"
    model = load_weights(Path(name), config, dtype, progress=False, state_dict=reference.state_dict())
    return model, reference


def random_model(config: ModelConfig, dtype: torch.dtype) -> Transformer:
    """kataru's model with random weights (norms at 1), allocated once in the target dtype."""
    model = Transformer.empty(config, dtype).to_empty(device="cpu")
    model.rotary = Rotary(config)  # to_empty left the tables uninitialised
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.fill_(1.0) if "norm" in name and name.endswith("weight") else p.normal_(0, 0.02)
    return model.eval().requires_grad_(False)
