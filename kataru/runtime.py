"""Where and in what precision a model runs: dtype names and the checkpoint's own dtype, and devices that
torch can use here. Messages name the parameter (`dtype=`, `device=`), which the CLI spells as flags."""

from __future__ import annotations

import torch

from kataru.config import ModelConfig
from kataru.errors import KataruError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DTYPE_ALIASES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16", "half": "float16", "float": "float32"}


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def resolve_dtype(name: str, config: ModelConfig) -> torch.dtype:
    """A dtype name, or "auto": the dtype config.json says the checkpoint was saved in (float32 if none)."""
    name = DTYPE_ALIASES.get(name, name)
    if name == "auto":
        saved = config.torch_dtype
        if isinstance(saved, str):
            saved = saved.removeprefix("torch.")
        return DTYPES.get(saved or "float32", torch.float32)
    if name not in DTYPES:
        raise KataruError(f"unknown dtype {name!r}; use auto, float32, bfloat16 or float16")
    return DTYPES[name]


def resolve_device(name: str) -> str:
    """A device torch can use here, or a one-line error naming what is missing."""
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):
        raise KataruError(f"unknown device {name!r}; use cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise KataruError(f"device {name!r}: this torch build ({torch.__version__}) sees no CUDA GPU; use device "
                              "cpu, or install a CUDA build of torch on a machine with a GPU")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise KataruError(f"device {name!r}: only {torch.cuda.device_count()} CUDA device(s) here")
    elif device.type != "cpu":
        raise KataruError(f"device {name!r} is not supported; use cpu, cuda or cuda:N")
    return str(device)
