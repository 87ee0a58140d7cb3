"""Weight-only quantization with torch's own packed matmul kernels (the ones gpt-fast uses).

int8: one scale per output channel, `aten._weight_int8pack_mm`, or on AVX2 CPUs kataru's own kernel
(`kataru.kernels`), which reads the int8 weights once for all rows of a decode batch or a prompt's block of
four rows.
int4: groups of `group_size` input channels with a scale and zero each, kataru's kernel on AVX2 CPUs, else
`aten._weight_int4pack_mm` (CPU or CUDA flavour).
kataru's kernels quantize the activations to int8 blocks, as llama.cpp does, for decode and prefill alike (a
prompt's rows get the bits each would get alone); torch's keep them in the model dtype. Without kataru's
kernels, or where autograd needs the matmul, CPU prefill dequantizes to float32 and runs one GEMM. Embeddings
and norms are not quantized.
"""

from __future__ import annotations

import copy
import shutil
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kataru import dispatch, kernels
from kataru.config import ModelConfig
from kataru.errors import KataruError
from kataru.files import read_json, replace_dir_atomic, write_json
from kataru.model import Linear, Transformer
from kataru.runtime import DTYPES, resolve_dtype

METHODS = ("int8", "int4")
SHORT = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "f32"}  # activation types in plan kinds


def dense_weight(linear: nn.Linear) -> Tensor:
    """The [out, in] weight, also of a `Linear` that keeps only its packed panels."""
    return linear.dense_weight() if isinstance(linear, Linear) else linear.weight


class QuantizedLinear(nn.Module):
    """What the int8 and int4 layers share: their paths (kataru's kernel, torch's packed matmul, dequantize and
    then float32 or 16-bit GEMM), chosen per call by `kataru.dispatch` on the CPU; torch's elsewhere."""

    in_features: int
    out_features: int
    paths = (*kernels.PATHS, "torch", "dequant", "dequant16")

    def forward(self, x: Tensor) -> Tensor:
        if x.device.type != "cpu":
            return self.run("torch", x)
        return self.run(dispatch.choose(self, x), x)

    @property
    def plan_shape(self) -> tuple[int, int]:
        return self.out_features, self.in_features

    def torch_path(self, x: Tensor, rows: int) -> str:
        return "torch" if self.can_run("torch", x) else "dequant"

    def can_run(self, path: str, x: Tensor) -> bool:
        raise NotImplementedError

    def run(self, path: str, x: Tensor) -> Tensor:
        raise NotImplementedError


class Int8Linear(QuantizedLinear):
    """int8 weights with one scale per output row. Where the shape allows (out % 8 == 0, in % 64 == 0) the
    weight is stored in the kernel's tiled layout (`kernels.tile_int8`), else row by row."""

    def __init__(self, in_features: int, out_features: int, bias: bool, dtype: torch.dtype) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.tiled = kernels.tiles_fit(out_features, in_features)
        shape = (out_features // kernels.TILE, in_features * kernels.TILE) if self.tiled else (out_features,
                                                                                                in_features)
        self.register_buffer("weight", torch.empty(shape, dtype=torch.int8))
        self.register_buffer("scales", torch.empty(out_features, dtype=dtype))
        self.register_buffer("bias", torch.empty(out_features, dtype=dtype) if bias else None)
        self.plain: Tensor | None = None  # [out, in] for torch's kernel, made once where that kernel runs
        self.scales32: Tensor | None = None  # the scales as the CPU kernel reads them, made once

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> Int8Linear:
        w = dense_weight(linear).detach().float()
        scales = (w.abs().amax(dim=1) / 127).clamp(min=1e-8)
        module = cls(linear.in_features, linear.out_features, linear.bias is not None, linear.weight.dtype)
        q = torch.round(w / scales[:, None]).clamp(-127, 127).to(torch.int8)
        module.weight = kernels.tile_int8(q) if module.tiled else q
        module.scales = scales.to(linear.weight.dtype)
        if linear.bias is not None:
            module.bias = linear.bias.detach().clone()
        return module

    def _scales32(self) -> Tensor:
        if self.scales32 is None:
            self.scales32 = self.scales.float()
        return self.scales32

    def plain_weight(self) -> Tensor:
        """The int8 values as [out, in]."""
        return kernels.untile_int8(self.weight) if self.tiled else self.weight

    # --- paths (`kataru.dispatch` picks one per call; the plumbing is QuantizedLinear's) -----------------

    @property
    def plan_kind(self) -> str:
        return "int8-" + SHORT[self.scales.dtype]

    def can_run(self, path: str, x: Tensor) -> bool:
        if path in kernels.PATHS:
            return kernels.usable(x, self.weight, isa=kernels.PATHS[path])
        if path == "torch":  # torch 2.13's int8 kernel crashes on several rows of a width not a multiple of 8
            return not x.requires_grad and x.shape[-1] % 8 == 0
        return path == "dequant" or x.dtype in kernels.HALF

    def run(self, path: str, x: Tensor) -> Tensor:
        if path in kernels.PATHS:
            return kernels.linear_int8(x, self.weight, self._scales32(), self.bias, self.tiled, kernels.PATHS[path])
        if path in ("dequant", "dequant16"):  # the weight in float32 (or x's 16-bit type), then one GEMM
            dtype = torch.float32 if path == "dequant" else x.dtype
            weight = (self.plain_weight().float() * self.scales.float().unsqueeze(1)).to(dtype)
            bias = None if self.bias is None else self.bias.to(dtype)
            return F.linear(x.to(dtype), weight, bias).to(x.dtype)
        shape = x.shape
        if self.plain is None or self.plain.device != x.device:
            self.plain = self.plain_weight().contiguous() if self.tiled else self.weight
        scales = self.scales if self.scales.dtype == x.dtype else self.scales.to(x.dtype)
        y = torch.ops.aten._weight_int8pack_mm(x.reshape(-1, shape[-1]), self.plain, scales)
        y = y.reshape(*shape[:-1], self.out_features)
        return y if self.bias is None else y + self.bias

    def default_path(self, x: Tensor, rows: int) -> str:
        """The fixed rule: the kernel for decode rows (and prompts in the tiled layout), else float32."""
        kernel = kernels.best_path(x, self.weight)
        if (rows < Linear.upcast_rows or self.tiled) and kernel:
            return kernel
        if rows >= Linear.upcast_rows or not self.can_run("torch", x):
            return "dequant"
        return "torch"

    def reference_weight(self) -> Tensor:
        return self.plain_weight().float() * self.scales.float().unsqueeze(1)


def int4_group_size(in_features: int, wanted: int) -> int:
    """The largest group size the kernels take (64..256), at most `wanted`, that divides the width."""
    for size in (256, 128, 64):
        if size <= max(wanted, 64) and in_features % size == 0:
            return size
    raise KataruError(f"int4 needs input widths divisible by 64; got {in_features}; use int8")


class Int4Linear(QuantizedLinear):
    """4-bit asymmetric groups: w ≈ (q - 8) * scale + zero, q in 0..15, stored two to a byte in tiles of 8 rows
    (`kernels.pack_int4`).

    kataru's CPU kernel reads that layout directly; torch's int4 kernels get their own packing, made once on
    the device that runs them, because the packed layout differs between kernels.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool, dtype: torch.dtype,
                 group_size: int = 64) -> None:
        super().__init__()
        group_size = int4_group_size(in_features, group_size)
        self.in_features, self.out_features, self.group_size = in_features, out_features, group_size
        groups = in_features // group_size
        self.register_buffer("qweight", torch.empty(out_features // kernels.TILE, in_features * 4,
                                                    dtype=torch.uint8))
        self.register_buffer("scales_and_zeros", torch.empty(groups, out_features, 2, dtype=dtype))
        self.register_buffer("bias", torch.empty(out_features, dtype=dtype) if bias else None)
        self.packed: Tensor | None = None  # torch's layout, on the device that ran last
        self.scale_min: Tensor | None = None  # the kernel's layout of scales and minimums

    @classmethod
    def from_linear(cls, linear: nn.Linear, group_size: int = 64) -> Int4Linear:
        w = dense_weight(linear).detach().float()
        n, k = w.shape
        module = cls(k, n, linear.bias is not None, linear.weight.dtype, group_size)
        group_size = module.group_size
        groups = w.reshape(n, k // group_size, group_size)
        low, high = groups.amin(-1, keepdim=True), groups.amax(-1, keepdim=True)
        scales = ((high - low) / 15).clamp(min=1e-8)
        zeros = low + scales * 8
        q = ((groups - low) / scales).round().clamp(0, 15).reshape(n, k)
        module.qweight = kernels.pack_int4(q)
        module.scales_and_zeros = torch.cat((scales, zeros), dim=-1).transpose(0, 1).contiguous().to(
            linear.weight.dtype)
        if linear.bias is not None:
            module.bias = linear.bias.detach().clone()
        return module

    def dequantize(self) -> Tensor:
        """The float32 weight [out, in] the 4-bit values stand for."""
        q = kernels.unpack_int4(self.qweight).float().reshape(self.out_features, -1, self.group_size)
        scales, zeros = self.scales_and_zeros.float().transpose(0, 1).unbind(-1)  # [out, groups] each
        return ((q - 8) * scales[..., None] + zeros[..., None]).reshape(self.out_features, self.in_features)

    def _torch_packed(self, device: torch.device) -> Tensor:
        if self.packed is None or self.packed.device != device:
            q = kernels.unpack_int4(self.qweight).to(device=device, dtype=torch.int32)
            if device.type == "cpu":
                self.packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1)
            else:
                packed_u8 = (q[:, ::2] << 4 | q[:, 1::2]).to(torch.uint8)
                self.packed = torch.ops.aten._convert_weight_to_int4pack(packed_u8, 8)
        return self.packed

    def _scale_min(self) -> Tensor:
        if self.scale_min is None:
            scales, zeros = self.scales_and_zeros.float().transpose(0, 1).unbind(-1)
            self.scale_min = kernels.int4_scale_min(scales, zeros - 8 * scales)
        return self.scale_min

    # --- paths (`kataru.dispatch` picks one per call; the plumbing is QuantizedLinear's) -----------------

    @property
    def plan_kind(self) -> str:
        return "int4-" + SHORT[self.scales_and_zeros.dtype]

    def can_run(self, path: str, x: Tensor) -> bool:
        if path in kernels.PATHS:
            return kernels.usable(x, self.qweight, isa=kernels.PATHS[path])
        if path == "torch":
            return not x.requires_grad
        return path == "dequant" or x.dtype in kernels.HALF

    def run(self, path: str, x: Tensor) -> Tensor:
        if path in kernels.PATHS:
            return kernels.linear_int4(x, self.qweight, self._scale_min(), self.group_size, self.bias,
                                       kernels.PATHS[path])
        if path in ("dequant", "dequant16"):  # the weight in float32 (or x's 16-bit type), then one GEMM
            dtype = torch.float32 if path == "dequant" else x.dtype
            bias = None if self.bias is None else self.bias.to(dtype)
            return F.linear(x.to(dtype), self.dequantize().to(dtype), bias).to(x.dtype)
        shape = x.shape
        flat = x.reshape(-1, shape[-1])
        packed = self._torch_packed(x.device)
        sz = self.scales_and_zeros.to(flat.dtype)
        if x.device.type == "cpu":
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(flat, packed, self.group_size, sz)
        else:
            y = torch.ops.aten._weight_int4pack_mm(flat, packed, self.group_size, sz)
        y = y.reshape(*shape[:-1], self.out_features)
        return y if self.bias is None else y + self.bias

    def default_path(self, x: Tensor, rows: int) -> str:
        """The fixed rule: the kernel wherever it runs, else float32 for prompts and torch's for decode."""
        slow = "dequant" if rows >= Linear.upcast_rows or x.requires_grad else "torch"
        return kernels.best_path(x, self.qweight) or slow

    def reference_weight(self) -> Tensor:
        return self.dequantize()


def _int4_fits(linear: nn.Linear, method: str) -> bool:
    """kataru's tiles and torch's int4 kernels (out_features % 16 == 0) must both fit; other layers get int8."""
    return method == "int4" and kernels.tiles_fit(linear.out_features, linear.in_features) and \
        linear.out_features % 16 == 0


def quantize(model: nn.Module, method: str, group_size: int = 64, inplace: bool = True) -> nn.Module:
    """Replace every Linear of the transformer blocks and the head with its quantized version.

    inplace=False leaves the model as it is and returns a quantized copy that shares its embeddings and
    norms (the benchmark measures several methods from one set of weights).
    """
    if method not in METHODS:
        raise KataruError(f"unknown quantization {method!r}; use one of {', '.join(METHODS)}")
    if model.tok_embeddings.weight.dtype == torch.float16 and method == "int8":  # type: ignore[union-attr]
        raise KataruError("int8 runs with bfloat16 or float32 activations; load the model with dtype bfloat16")
    if not inplace:  # a copy sharing every tensor: nothing is copied until a linear is replaced
        packed = [m.packed for m in model.modules() if isinstance(m, Linear) and m.packed is not None]
        memo: dict[int, object] = {id(t): t for t in [*model.parameters(), *model.buffers(), *packed]}
        model = copy.deepcopy(model, memo)

    def convert(linear: nn.Linear) -> nn.Module:
        if _int4_fits(linear, method):
            return Int4Linear.from_linear(linear, group_size)
        return Int8Linear.from_linear(linear)

    return _replace_linears(model, method, convert)


def empty_quantized(model: nn.Module, method: str, group_size: int = 64) -> nn.Module:
    """The quantized structure with empty buffers, to load a saved quantized state dict into."""

    def empty(linear: nn.Linear) -> nn.Module:
        args = (linear.in_features, linear.out_features, linear.bias is not None, linear.weight.dtype)
        return Int4Linear(*args, group_size) if _int4_fits(linear, method) else Int8Linear(*args)

    return _replace_linears(model, method, empty)


def _replace_linears(model: nn.Module, method: str, make: Callable[[nn.Linear], nn.Module]) -> nn.Module:
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.Linear):
                setattr(parent, name, make(child))
    model.quantization = method  # type: ignore[assignment]
    return model


QUANT_FILE = "kataru_quantization.json"
FORMAT = 2  # 2: int8 and 4-bit weights in the CPU kernels' tiles of 8 rows, 4-bit two to a byte
COPIED = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
          "special_tokens_map.json", "added_tokens.json", "chat_template.jinja", "chat_template.json")


def read_quantization(folder: Path) -> dict | None:
    path = folder / QUANT_FILE
    if not path.is_file():
        return None
    info = read_json(path, "quantize the checkpoint again")
    if info.get("method") not in METHODS:
        raise KataruError(f"{path} names an unknown method {info.get('method')!r}; quantize the checkpoint again")
    if info.get("format", 1) != FORMAT:
        raise KataruError(f"{folder} was quantized in an older layout (format {info.get('format', 1)}, this kataru "
                          f"reads {FORMAT}); quantize the original checkpoint again")
    return info


def save_quantized(model: nn.Module, source: Path, out: Path) -> Path:
    """model.safetensors in kataru's own layout, the source's config and tokenizer files, and a marker, written
    as one folder renamed into place: killed at any moment, `out` is either absent (or what it was) or whole."""
    from safetensors.torch import save

    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    group = max((m.group_size for m in model.modules() if isinstance(m, Int4Linear)), default=None)
    info = {"method": model.quantization, "format": FORMAT, "group_size": group,
            "dtype": str(model.tok_embeddings.weight.dtype).removeprefix("torch.")}

    def fill(tmp: Path) -> None:
        for name in COPIED:
            if (source / name).is_file():
                shutil.copy(source / name, tmp / name)
        for model_file in source.glob("*.model"):
            shutil.copy(model_file, tmp / model_file.name)
        (tmp / "model.safetensors").write_bytes(save(state, metadata={"format": "kataru"}))
        write_json(tmp / QUANT_FILE, info)

    if out.resolve() == source.resolve():
        raise KataruError(f"{out} is the checkpoint being quantized; write the quantized copy to another folder")
    try:
        return replace_dir_atomic(out, fill)
    except OSError as err:
        raise KataruError(f"writing {out} failed ({err.strerror or err}); nothing was left there: free space or "
                          "choose another folder") from None


def load_quantized(folder: Path, config: ModelConfig, info: dict, device: str = "cpu", dtype: str = "auto",
                   quantize: str | None = None) -> Transformer:
    """A folder `save_quantized` wrote, as it was saved; dtype (other than auto) converts its activations,
    embeddings and norms; a quantize= other than the folder's method is refused rather than ignored."""
    from safetensors.torch import load_file

    method = info["method"]
    if quantize and quantize != method:
        raise KataruError(f"{folder} is already quantized with {method}; load it without quantize= (or quantize "
                          "the original checkpoint with " + quantize + ")")
    saved = DTYPES[info.get("dtype", "bfloat16")]
    wanted = saved if dtype == "auto" else resolve_dtype(dtype, config)
    if wanted == torch.float16 and method == "int8":
        raise KataruError("int8 runs with bfloat16 or float32 activations; load it with dtype bfloat16 or float32")
    model = Transformer.empty(config, saved)
    empty_quantized(model, method, info.get("group_size") or 64)
    try:
        state = load_file(str(folder / "model.safetensors"), device=device)
    except Exception as err:
        raise KataruError(f"quantized weights in {folder} cannot be read ({str(err)[:200]}); "
                          "quantize the checkpoint again") from None
    try:
        model.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as err:
        raise KataruError(f"quantized weights in {folder} do not match config.json ({str(err).splitlines()[0]}); "
                          "quantize the checkpoint again") from None
    model.rotary = model.rotary.to(device)
    if wanted != saved:
        model = model.to(wanted)  # floating tensors only: the int8 and 4-bit weights stay as they are
    return model.eval().requires_grad_(False)
