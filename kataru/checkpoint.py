"""Read a Hugging Face checkpoint folder into kataru's Transformer, one weight layout per family.

Each layout is a plan: for every kataru tensor, the published tensors it is built from and how (fused
q/k/v, NeoX's per-head interleaved qkv, Alpha's packed MLP). The plan also tells which tensors a file
must hold, so a missing or stray tensor is named instead of silently ignored.

Weights are read lazily (safetensors is memory mapped; .bin goes through `torch.load(weights_only=True,
mmap=True)`, never a full unpickle) and converted one tensor at a time, so loading peaks near the size
of the weights in the target dtype.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from kataru.config import ModelConfig
from kataru.errors import KataruError
from kataru.model import Rotary, Transformer

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DTYPE_ALIASES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16", "half": "float16", "float": "float32"}

# Non-parameter buffers that older uploads keep in their state dict; everything else must be used.
IGNORED_BUFFERS = re.compile(r"\.rotary_emb\.(inv_freq|scale)$|\.attention\.(bias|masked_bias)$")


@dataclass
class Source:
    names: list[str]
    combine: Callable[[list[Tensor]], Tensor]


def _one(parts: list[Tensor]) -> Tensor:
    return parts[0]


def _cat(parts: list[Tensor]) -> Tensor:
    return torch.cat(parts, dim=0)


def _swap_halves(parts: list[Tensor]) -> Tensor:
    """Alpha packs the MLP input as [up; gate]; kataru keeps [gate; up]."""
    up, gate = parts[0].chunk(2, dim=0)
    return torch.cat((gate, up), dim=0)


def _deinterleave_qkv(n_head: int) -> Callable[[list[Tensor]], Tensor]:
    """GPT-NeoX fuses qkv per head ([q0 k0 v0 q1 k1 v1 …]); kataru keeps [q; k; v]."""

    def combine(parts: list[Tensor]) -> Tensor:
        w = parts[0]
        rest = w.shape[1:]
        return w.reshape(n_head, 3, -1, *rest).transpose(0, 1).reshape(-1, *rest)

    return combine


def weight_plan(config: ModelConfig) -> dict[str, Source]:
    """kataru tensor name -> where it comes from in the family's published layout."""
    plan: dict[str, Source] = {}
    family = config.family

    def add(name: str, names: list[str], combine: Callable[[list[Tensor]], Tensor] = _one) -> None:
        plan[name] = Source(names, combine)

    def norm(kataru: str, hf: str, affine: bool = True) -> None:
        if not affine:
            return
        add(f"{kataru}.weight", [f"{hf}.weight"])
        if config.norm_bias:
            add(f"{kataru}.bias", [f"{hf}.bias"])

    if family in ("llama", "mistral", "stablelm"):
        add("tok_embeddings.weight", ["model.embed_tokens.weight"])
        for i in range(config.n_layer):
            p, k = f"model.layers.{i}", f"layers.{i}"
            norm(f"{k}.attention_norm", f"{p}.input_layernorm")
            norm(f"{k}.ffn_norm", f"{p}.post_attention_layernorm")
            add(f"{k}.attention.wqkv.weight", [f"{p}.self_attn.{x}_proj.weight" for x in "qkv"], _cat)
            if config.qkv_bias:
                add(f"{k}.attention.wqkv.bias", [f"{p}.self_attn.{x}_proj.bias" for x in "qkv"], _cat)
            add(f"{k}.attention.wo.weight", [f"{p}.self_attn.o_proj.weight"])
            if config.o_bias:
                add(f"{k}.attention.wo.bias", [f"{p}.self_attn.o_proj.bias"])
            add(f"{k}.feed_forward.w1.weight", [f"{p}.mlp.gate_proj.weight", f"{p}.mlp.up_proj.weight"], _cat)
            add(f"{k}.feed_forward.w2.weight", [f"{p}.mlp.down_proj.weight"])
            if config.mlp_bias:
                add(f"{k}.feed_forward.w1.bias", [f"{p}.mlp.gate_proj.bias", f"{p}.mlp.up_proj.bias"], _cat)
                add(f"{k}.feed_forward.w2.bias", [f"{p}.mlp.down_proj.bias"])
        norm("norm", "model.norm")
        head = "lm_head.weight"
    else:  # gpt_neox and japanese_stablelm_alpha share NeoX naming
        alpha = family == "japanese_stablelm_alpha"
        root = "transformer" if alpha else "gpt_neox"
        qkv = _deinterleave_qkv(config.n_head)
        add("tok_embeddings.weight", [f"{root}.embed_in.weight"])
        for i in range(config.n_layer):
            p, k = f"{root}.layers.{i}", f"layers.{i}"
            norm(f"{k}.attention_norm", f"{p}.input_layernorm", affine=config.attn_norm_affine)
            norm(f"{k}.ffn_norm", f"{p}.post_attention_layernorm")
            add(f"{k}.attention.wqkv.weight", [f"{p}.attention.query_key_value.weight"], qkv)
            add(f"{k}.attention.wo.weight", [f"{p}.attention.dense.weight"])
            if config.qkv_bias:
                add(f"{k}.attention.wqkv.bias", [f"{p}.attention.query_key_value.bias"], qkv)
            if config.o_bias:
                add(f"{k}.attention.wo.bias", [f"{p}.attention.dense.bias"])
            if alpha:
                add(f"{k}.feed_forward.w1.weight", [f"{p}.mlp.packed_input_proj.weight"], _swap_halves)
                add(f"{k}.feed_forward.w2.weight", [f"{p}.mlp.out_proj.weight"])
            else:
                for kataru_name, hf in (("w1", "dense_h_to_4h"), ("w2", "dense_4h_to_h")):
                    add(f"{k}.feed_forward.{kataru_name}.weight", [f"{p}.mlp.{hf}.weight"])
                    add(f"{k}.feed_forward.{kataru_name}.bias", [f"{p}.mlp.{hf}.bias"])
        norm("norm", f"{root}.final_layer_norm")
        head = "embed_out.weight"
    if not config.tie_embeddings:
        add("output.weight", [head])
    return plan


def optional_tensors(config: ModelConfig) -> set[str]:
    """Tensors a file may hold that kataru does not need (a saved copy of a tied head)."""
    return {"lm_head.weight", "embed_out.weight"} if config.tie_embeddings else set()


def resolve_dtype(name: str, config: ModelConfig) -> torch.dtype:
    name = DTYPE_ALIASES.get(name, name)
    if name == "auto":
        saved = config.torch_dtype
        if isinstance(saved, str):
            saved = saved.removeprefix("torch.")
        return DTYPES.get(saved or "float32", torch.float32)
    if name not in DTYPES:
        raise KataruError(f"unknown dtype {name!r}; use auto, float32, bfloat16 or float16")
    return DTYPES[name]


class WeightFiles:
    """Every tensor of a checkpoint folder, by name, opened lazily."""

    def __init__(self, folder: Path, stack: ExitStack) -> None:
        self.folder = folder
        self.stack = stack
        self.location: dict[str, Path] = {}
        self.handles: dict[Path, object] = {}
        for path in self._files():
            for name in self._open(path):
                self.location.setdefault(name, path)

    def _files(self) -> list[Path]:
        for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
            index = self.folder / index_name
            if index.is_file():
                try:
                    weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
                except (json.JSONDecodeError, KeyError, UnicodeDecodeError):
                    raise KataruError(f"{index} is not a valid index file; restore it from the checkpoint") from None
                shards = sorted(set(weight_map.values()))
                missing = [s for s in shards if not (self.folder / s).is_file()]
                if missing:
                    raise KataruError(
                        f"shard {missing[0]} listed in {index_name} is missing from {self.folder}; "
                        "download or copy every shard of the checkpoint"
                    )
                return [self.folder / s for s in shards]
        found = sorted(self.folder.glob("*.safetensors")) or sorted(self.folder.glob("pytorch_model*.bin"))
        if not found:
            raise KataruError(
                f"no weights in {self.folder}: expected model.safetensors, sharded *.safetensors with an "
                "index, or pytorch_model.bin"
            )
        return found

    def _open(self, path: Path) -> list[str]:
        if path.suffix == ".safetensors":
            from safetensors import safe_open

            try:
                handle = self.stack.enter_context(safe_open(str(path), framework="pt"))
            except Exception as err:  # safetensors raises its own error types for bad headers
                raise KataruError(
                    f"weight file {path.name} is truncated or corrupt ({_first_line(err)}); copy it again"
                ) from None
            self.handles[path] = handle
            return list(handle.keys())
        try:
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except Exception as err:  # torch raises RuntimeError, UnpicklingError, EOFError … for a bad file
            message = _first_line(err)
            if "weights_only" in message or "Unpickl" in type(err).__name__:
                raise KataruError(
                    f"{path.name} holds more than tensors and kataru never executes pickled code; "
                    "convert the checkpoint to safetensors"
                ) from None
            raise KataruError(f"weight file {path.name} is truncated or corrupt ({message}); copy it again") from None
        if not isinstance(state, dict):
            raise KataruError(f"{path.name} does not hold a state dict; convert the checkpoint to safetensors")
        self.handles[path] = state
        return list(state.keys())

    def get(self, name: str) -> Tensor:
        path = self.location[name]
        handle = self.handles[path]
        try:
            return handle[name] if isinstance(handle, dict) else handle.get_tensor(name)  # type: ignore[attr-defined]
        except Exception as err:
            raise KataruError(
                f"tensor {name} in {path.name} cannot be read ({_first_line(err)}); copy the file again"
            ) from None


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return text[0][:200] if text else type(err).__name__


def load_weights(folder: Path, config: ModelConfig, dtype: torch.dtype, device: str = "cpu",
                 progress: bool | None = None) -> Transformer:
    """Build the model on the meta device, then fill it tensor by tensor from the files."""
    plan = weight_plan(config)
    with torch.device("meta"):
        model = Transformer(config)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    with ExitStack() as stack:
        files = WeightFiles(folder, stack)
        needed = {n for source in plan.values() for n in source.names}
        missing = sorted(needed - files.location.keys())
        if missing:
            more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
            raise KataruError(
                f"checkpoint {folder} lacks tensor(s) {', '.join(missing[:3])}{more} that a {config.family} model "
                f"with {config.n_layer} layers needs; the weights do not match config.json or a shard is missing"
            )
        unused = files.location.keys() - needed - optional_tensors(config)
        extra = sorted(n for n in unused if not IGNORED_BUFFERS.search(n))
        if extra:
            more = f" and {len(extra) - 3} more" if len(extra) > 3 else ""
            raise KataruError(
                f"checkpoint {folder} has unexpected tensor(s) {', '.join(extra[:3])}{more}; "
                "the weights do not match config.json (wrong architecture or layer count)"
            )
        state: dict[str, Tensor] = {}
        for name, source in _progress(plan.items(), len(plan), progress):
            parts = [_checked(files.get(n), n) for n in source.names]
            try:
                tensor = source.combine([p.to(device=device, dtype=dtype) for p in parts])
            except RuntimeError as err:
                raise KataruError(f"tensor(s) {', '.join(source.names)} have shapes that do not fit together "
                                  f"({_first_line(err)}); the weights do not match config.json") from None
            if tuple(tensor.shape) != expected[name]:
                shapes = ", ".join(f"{n} {tuple(p.shape)}" for n, p in zip(source.names, parts, strict=False))
                raise KataruError(
                    f"shape mismatch: {shapes} gives {tuple(tensor.shape)}, config.json implies {expected[name]}; "
                    "the weights do not match config.json"
                )
            state[name] = tensor.contiguous()
            del parts, tensor
    if config.tie_embeddings:
        state["output.weight"] = state["tok_embeddings.weight"]
    model.load_state_dict(state, strict=True, assign=True)
    if config.tie_embeddings:
        model.output.weight = model.tok_embeddings.weight
    with torch.device(device):
        model.rotary = Rotary(config)
    return model.eval().requires_grad_(False)


def _checked(tensor: Tensor, name: str) -> Tensor:
    if not tensor.is_floating_point():
        raise KataruError(f"tensor {name} has dtype {tensor.dtype}, not floating point; the checkpoint is quantized "
                          "or corrupt and kataru reads float32/bfloat16/float16 weights")
    return tensor


def _progress(items: Iterator | object, total: int, progress: bool | None):  # type: ignore[no-untyped-def]
    if progress is False:
        return items
    from tqdm import tqdm

    # disable=None hides the bar when stderr is not a terminal (tests, pipes, CI).
    return tqdm(items, total=total, desc="loading weights", unit="tensor", disable=None if progress is None else False,
                leave=False)
