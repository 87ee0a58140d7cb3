"""CPU kernels for decoding, compiled on first use with the system's C compiler: matmuls for bf16, fp16, int8
and 4-bit weights (`linear.c`), one-query attention over the KV cache (`attention.c`) and RMSNorm (`norm.c`).

On AVX2 CPUs without native bf16 (this project's machine), torch's bf16 and fp16 matmuls for a few rows
stream the weights well below the memory bandwidth, and their time grows with the number of rows: batch-8
decoding costs eight times batch 1. `linear.c` reads each weight once for every row of the batch at
close to the bandwidth; for int8 and 4-bit weights it quantizes the input rows to int8 blocks and sums
with integer dot products, as llama.cpp does. It is built once per source version into the user's cache
(`$KATARU_CACHE`, default `~/.cache/kataru`) and loaded with ctypes; with no compiler, no AVX2, or
`KATARU_KERNELS=0`, kataru uses torch's kernels, which give the same results up to rounding. Each kernel is
also a torch operator (`torch.ops.kataru.*`) that a torch.compile'd decode step calls from its graph.

Where the CPU has AVX-512 (F, BW, VL, DQ, as cpuid reports and the OS enables), the matmuls are built a second
time with it (and with VNNI's vpdpbusd and AVX512-BF16's vdpbf16ps where the CPU has those too): the
"kernel-avx512" path beside the AVX2 "kernel" one, which `kataru.dispatch` times against each other and torch's
paths. A compiler that cannot build the AVX-512 variant (or its VNNI and BF16 parts), or
`KATARU_KERNEL_ISA=avx2`, leaves the AVX2 build (or AVX-512 without them): never an error.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

SOURCES = tuple(Path(__file__).with_name(name) for name in ("linear.c", "attention.c", "norm.c"))
HEADER = Path(__file__).with_name("simd.h")  # included by every source
# FMA only where written; F16C (fp16 weights) comes with every AVX2 CPU
FLAGS = ("-O3", "-mavx2", "-mfma", "-mf16c", "-ffp-contract=off", "-fopenmp", "-fPIC", "-shared")

AVX512 = ("-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq")
ISAS = ("avx2", "avx512")  # the builds: every kernel with AVX2; the matmuls again with AVX-512
PATHS = {"kernel": "avx2", "kernel-avx512": "avx512"}  # the layers' kernel paths (`kataru.dispatch`) and their build
# the packed bf16 layout's paths and their build (with AVX512-BF16, the AVX-512 one sums by vdpbf16ps)
PACKED_PATHS = {"packed": "avx2", "packed-avx512": "avx512"}

ACTIVATIONS = (torch.float32, torch.bfloat16)  # the types the kernels read and write besides their weights
KINDS = ("linear", "attention", "norm")
# "lib": the loaded library per build (None once tried and failed); "off": per kind, how many `disabled` blocks
# are open; "stub": how many `stubbed` blocks are open
_state: dict[str, Any] = {"lib": {}, "off": dict.fromkeys(KINDS, 0), "stub": 0}


def cache_dir() -> Path:
    root = os.environ.get("KATARU_CACHE") or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "kataru"
    return Path(root) / "kernels"


@functools.cache
def cpuinfo() -> dict[str, str]:
    """The first processor's fields in Linux's /proc/cpuinfo (model name, flags, ...); empty elsewhere."""
    fields: dict[str, str] = {}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if not line.strip():
                break
            key, _, value = line.partition(":")
            fields.setdefault(key.strip(), value.strip())
    except OSError:
        pass
    return fields


def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags as Linux reports them (those the OS has enabled); empty elsewhere."""
    info = cpuinfo()
    return frozenset((info.get("flags") or info.get("Features") or "").split())


def supported(isa: str = "avx2") -> bool:
    """x86-64 with AVX2 (torch's own dispatch says so) and not switched off; for "avx512" also AVX-512 F, BW,
    VL and DQ (torch's AVX512 level, which checks that the OS saves the registers) and no KATARU_KERNEL_ISA=avx2."""
    if os.environ.get("KATARU_KERNELS", "1") == "0" or platform.machine().lower() not in ("x86_64", "amd64"):
        return False
    capability = torch.backends.cpu.get_cpu_capability()
    if isa == "avx2":
        return capability in ("AVX2", "AVX512")
    return (isa == "avx512" and capability == "AVX512" and os.environ.get("KATARU_KERNEL_ISA", "") != "avx2"
            and {"avx512f", "avx512bw", "avx512vl", "avx512dq"} <= cpu_flags())


OPTIONAL = {"avx512_vnni": "-mavx512vnni", "avx512_bf16": "-mavx512bf16"}  # CPU flag: compiler flag


def isa_flags(isa: str) -> list[tuple[str, ...]]:
    """The compiler flags to try for a build, best first: AVX2's; for "avx512" AVX-512's plus VNNI and BF16
    where the CPU has them, then without those (a compiler too old for them still builds the rest)."""
    if isa == "avx2":
        return [FLAGS]
    extra = tuple(flag for cpu, flag in OPTIONAL.items() if cpu in cpu_flags())
    return [(*FLAGS, *AVX512, *extra)] + ([(*FLAGS, *AVX512)] if extra else [])


def build_any(flag_sets: list[tuple[str, ...]]) -> Path:
    """The library of the first flag set the compiler accepts."""
    for flags in flag_sets[:-1]:
        try:
            return build(flags=flags)
        except (RuntimeError, subprocess.SubprocessError):
            continue
    return build(flags=flag_sets[-1])


def build(sources: tuple[Path, ...] = SOURCES, flags: tuple[str, ...] = FLAGS) -> Path:
    """The shared library for `sources`, compiled once into the cache (atomically: a temp file, then rename)."""
    compiler = os.environ.get("CC") or "cc"
    text = b"".join(source.read_bytes() for source in (*sources, HEADER))
    digest = hashlib.sha256(text + " ".join((compiler, *flags)).encode()).hexdigest()[:16]
    target = cache_dir() / f"kataru-{digest}.so"
    if target.exists():
        return target
    if shutil.which(compiler) is None:
        raise RuntimeError(f"no C compiler ({compiler})")
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
    os.close(fd)
    try:
        run = subprocess.run([compiler, *flags, *map(str, sources), "-o", tmp, "-lm"], capture_output=True, text=True)
        if run.returncode != 0:
            raise RuntimeError(f"{compiler} failed: {run.stderr.strip().splitlines()[-1:]}")
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target


def library(isa: str = "avx2") -> ctypes.CDLL | None:
    """The compiled kernels of a build ("avx2" or "avx512"), or None where they cannot run here (decided once
    per process)."""
    if all(_state["off"].values()):
        return None
    if isa not in _state["lib"]:
        lib = None
        if supported(isa):
            try:
                lib = ctypes.CDLL(str(build_any(isa_flags(isa))))
                pointer, size, threads = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
                flag = ctypes.c_int
                lib.kataru_linear_bf16.argtypes = [*[pointer] * 4, *[size] * 3, flag, threads]
                lib.kataru_linear_f16.argtypes = [*[pointer] * 4, *[size] * 3, flag, threads]
                lib.kataru_linear_bf16_packed.argtypes = [*[pointer] * 4, *[size] * 3, flag, threads]
                lib.kataru_linear_int8.argtypes = [*[pointer] * 5, *[size] * 3, flag, threads]
                lib.kataru_linear_int8_tiled.argtypes = [*[pointer] * 5, *[size] * 3, flag, threads]
                lib.kataru_linear_int4.argtypes = [*[pointer] * 5, *[size] * 4, flag, threads]
                lib.kataru_decode_attention.argtypes = [*[pointer] * 2, size, *[pointer] * 5, *[size] * 6,
                                                        ctypes.c_float, flag, flag, threads]
                lib.kataru_decode_attention.restype = None
                lib.kataru_rms_norm.argtypes = [*[pointer] * 3, size, size, ctypes.c_float, flag]
                lib.kataru_rms_norm.restype = None
                lib.kataru_extensions.argtypes = []
                lib.kataru_extensions.restype = ctypes.c_int
                for fn in (lib.kataru_linear_bf16, lib.kataru_linear_f16, lib.kataru_linear_bf16_packed,
                           lib.kataru_linear_int8,
                           lib.kataru_linear_int8_tiled, lib.kataru_linear_int4):
                    fn.restype = None
            except (OSError, RuntimeError, subprocess.SubprocessError) as err:
                lib = None
                if os.environ.get("KATARU_DEBUG"):
                    print(f"kataru: {isa} CPU kernels unavailable ({err}); using "
                          f"{'the AVX2 build' if isa != 'avx2' else 'torch'}'s matmul", file=sys.stderr)
        _state["lib"][isa] = lib
    return _state["lib"][isa]  # type: ignore[no-any-return]


def available(kind: str = "linear", isa: str = "avx2") -> bool:
    """Whether the kernels of this kind (linear, attention, norm) and build run here and now (the AVX-512
    build has the matmuls only)."""
    if _state["off"][kind] or (isa != "avx2" and kind != "linear"):
        return False
    if torch.compiler.is_compiling():  # a trace cannot build or load the library: `compiled_decode` loaded it
        return _state["lib"].get(isa) is not None
    return library(isa) is not None


def isas() -> list[str]:
    """The builds of the matmul kernels that run here."""
    return [isa for isa in ISAS if available("linear", isa)]


def extensions(isa: str = "avx512") -> list[str]:
    """What a build's matmuls use beyond its base instruction set: "vnni" (vpdpbusd) and "bf16" (vdpbf16ps),
    where the CPU has them and the compiler could build them; [] for a build that does not run here."""
    lib = library(isa) if available("linear", isa) else None
    bits = lib.kataru_extensions() if lib is not None else 0
    return [name for bit, name in ((1, "vnni"), (2, "bf16")) if bits & bit]


def applicable(weight: Tensor, kind: str = "linear", isa: str = "avx2") -> bool:
    """Whether a CPU weight can go through the kernels now: they run here and the weight is contiguous."""
    return weight.is_contiguous() and available(kind, isa)


def usable(x: Tensor, weight: Tensor, kind: str = "linear", isa: str = "avx2") -> bool:
    """`applicable(weight)`, and autograd needs nothing from this call (a ctypes call has no backward)."""
    wants_grad = torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad)
    return not wants_grad and applicable(weight, kind, isa)


def best_path(x: Tensor, weight: Tensor) -> str | None:
    """The kernel path cpuid suggests for a matmul (AVX-512 where it runs, else AVX2), None without kernels."""
    return next((path for path, isa in reversed(PATHS.items()) if usable(x, weight, isa=isa)), None)


class _Stub:
    """Stands in for the library inside `stubbed()`: every kataru_* function returns at once."""

    def __getattr__(self, name: str) -> Callable[..., None]:
        return lambda *args: None


def _loaded(caller: str, isa: str = "avx2") -> ctypes.CDLL | _Stub:
    """The library, for callers that checked `applicable` first."""
    if _state["stub"]:
        return _Stub()
    lib = library(isa)
    assert lib is not None, f"{caller} called where the {isa} kernels are unavailable"
    return lib


def _io(x: Tensor, n: int, bias: Tensor | None) -> tuple[Tensor, Tensor, Tensor | None, int]:
    """(input rows [M, K], the output [M, n] to fill, the bias, bf16 flag), all in one activation type: x's
    where the kernels take it, else float32."""
    rows = x.reshape(-1, x.shape[-1])
    rows = (rows if rows.dtype in ACTIVATIONS else rows.float()).contiguous()
    bias = None if bias is None else bias.to(rows.dtype).contiguous()
    return rows, _output(rows.shape[0], n, dtype=rows.dtype), bias, int(rows.dtype == torch.bfloat16)


def _output(*shape: int, dtype: torch.dtype) -> Tensor:
    """A kernel's output, for it to fill; zeros inside `stubbed()`, where no kernel writes it (garbage could be
    NaN, which the engine treats as a failed row and stops decoding)."""
    return torch.zeros(*shape, dtype=dtype) if _state["stub"] else torch.empty(*shape, dtype=dtype)


def _pointer(t: Tensor | None) -> int:
    return 0 if t is None else t.data_ptr()


def _shaped(y: Tensor, x: Tensor) -> Tensor:
    return y.reshape(*x.shape[:-1], y.shape[-1]).to(x.dtype)


HALF = (torch.bfloat16, torch.float16)  # the 16-bit float weights `linear_half` reads


def _linear_half(x: Tensor, weight: Tensor, bias: Tensor | None = None, isa: str = "avx2") -> Tensor:
    """F.linear with a contiguous bf16 or fp16 CPU weight (float32 accumulation, one rounding to x's dtype).

    The caller checks `applicable(weight, isa=isa)` and that no gradient is wanted.
    """
    lib = _loaded("linear_half", isa)
    n, k = weight.shape
    rows, y, bias, bf16 = _io(x, n, bias)
    fn = lib.kataru_linear_f16 if weight.dtype == torch.float16 else lib.kataru_linear_bf16
    fn(rows.data_ptr(), weight.data_ptr(), _pointer(bias), y.data_ptr(), rows.shape[0], k, n, bf16,
       torch.get_num_threads())
    return _shaped(y, x)


PANEL = 16  # output rows of a panel in linear.c's packed bf16 layout


def panels_fit(out_features: int) -> bool:
    return out_features % PANEL == 0


def pack_bf16(weight: Tensor) -> Tensor:
    """bf16 [N, K] (N % 16 == 0) as the packed kernel reads it, [N/16, K, 16]: panels of 16 rows, step k of a
    panel holding row i's weight k at 2i and row i + 8's at 2i + 1 (one 32-bit lane: linear.c, panel)."""
    n, k = weight.shape
    return weight.reshape(n // PANEL, 2, PANEL // 2, k).permute(0, 3, 2, 1).reshape(n // PANEL, k, PANEL).contiguous()


def unpack_bf16(packed: Tensor) -> Tensor:
    panels, k, _ = packed.shape
    return packed.reshape(panels, k, PANEL // 2, 2).permute(0, 3, 2, 1).reshape(panels * PANEL, k)


def _linear_packed(x: Tensor, packed: Tensor, bias: Tensor | None = None, isa: str = "avx2") -> Tensor:
    """F.linear with a bf16 CPU weight in `pack_bf16`'s layout: float32 sums, each output one chain in input
    order (the same bits at any row count), one rounding to x's dtype. The AVX2 build sums float32 FMAs; the
    AVX-512 build with AVX512-BF16 sums pairs of products by vdpbf16ps, the input rounded to bf16 (without
    BF16, the AVX2 code in wider registers). The caller checks `applicable(packed, isa=isa)` and that no
    gradient is wanted."""
    lib = _loaded("linear_packed", isa)
    panels, k, _ = packed.shape
    rows, y, bias, bf16 = _io(x, panels * PANEL, bias)
    lib.kataru_linear_bf16_packed(rows.data_ptr(), packed.data_ptr(), _pointer(bias), y.data_ptr(), rows.shape[0], k,
                                  panels * PANEL, bf16, torch.get_num_threads())
    return _shaped(y, x)


TILE = 8  # output rows interleaved in linear.c's tiled layouts (int8 and 4-bit)
BLOCK = 64  # linear.c's QB: the input block; tiled widths and 4-bit groups are multiples of it


def tiles_fit(out_features: int, in_features: int) -> bool:
    return out_features % TILE == 0 and in_features % BLOCK == 0


def tile_int8(q: Tensor) -> Tensor:
    """int8 [N, K] (N % 8 == 0, K % 64 == 0) as the kernel streams it, [N/8, 8K]: tiles of 8 rows, each a run
    of K/4 steps of 32 bytes, byte 4r + j of step s holding row r's value 4s + j (linear.c, tile8)."""
    n, k = q.shape
    return q.reshape(n // TILE, TILE, k // 4, 4).permute(0, 2, 1, 3).reshape(n // TILE, TILE * k).contiguous()


def untile_int8(tiled: Tensor) -> Tensor:
    tiles, width = tiled.shape
    k = width // TILE
    return tiled.reshape(tiles, k // 4, TILE, 4).permute(0, 2, 1, 3).reshape(tiles * TILE, k)


def _linear_int8(x: Tensor, weight: Tensor, scales: Tensor, bias: Tensor | None = None, tiled: bool = False,
                 isa: str = "avx2") -> Tensor:
    """x @ (w * scales[:, None]).T + bias for contiguous int8 CPU weights (w [N, K], or `tile_int8(w)` with
    tiled=True, the faster layout) and float32 scales.

    Each input row is quantized to int8 in blocks of 64 values (step max|x_block| / 127), as llama.cpp's
    Q8_0 does, and the products are summed exactly in int32 per block.
    """
    lib = _loaded("linear_int8", isa)
    n, k = (weight.shape[0] * TILE, weight.shape[1] // TILE) if tiled else weight.shape
    rows, y, bias, bf16 = _io(x, n, bias)
    fn = lib.kataru_linear_int8_tiled if tiled else lib.kataru_linear_int8
    fn(rows.data_ptr(), weight.data_ptr(), scales.data_ptr(), _pointer(bias), y.data_ptr(), rows.shape[0], k, n, bf16,
       torch.get_num_threads())
    return _shaped(y, x)


def pack_int4(q: Tensor) -> Tensor:
    """4-bit values [N, K] (0..15; N % 8 == 0, K % 64 == 0) in the kernel's layout, bytes [N/8, 4K]: tiles of 8
    rows, each a run of K/8 steps of 32 bytes, byte 4r + j of step s holding row r's value 8s + j in its low
    and 8s + 4 + j in its high nibble (linear.c, tile4)."""
    n, k = q.shape
    steps = q.to(torch.uint8).reshape(n // TILE, TILE, k // 8, 2, 4)  # tile, row, step, half, j
    nibbles = steps[:, :, :, 0] | steps[:, :, :, 1] << 4  # tile, row, step, j
    return nibbles.permute(0, 2, 1, 3).reshape(n // TILE, 4 * k).contiguous()


def unpack_int4(packed: Tensor) -> Tensor:
    tiles, width = packed.shape
    k = width // 4
    nibbles = packed.reshape(tiles, k // 8, TILE, 4).permute(0, 2, 1, 3)  # tile, row, step, j
    values = torch.stack((nibbles & 15, nibbles >> 4), dim=3)  # tile, row, step, half, j
    return values.reshape(tiles * TILE, k)


def int4_scale_min(scales: Tensor, mins: Tensor) -> Tensor:
    """[N, groups] scales and minimums as the kernel reads them: bf16 [N/8, groups, 2, 8]."""
    n, groups = scales.shape
    both = torch.stack((scales, mins), dim=-1).reshape(n // TILE, TILE, groups, 2)
    return both.permute(0, 2, 3, 1).bfloat16().contiguous()


def _linear_int4(x: Tensor, packed: Tensor, scale_min: Tensor, group_size: int, bias: Tensor | None = None,
                 isa: str = "avx2") -> Tensor:
    """x @ w.T + bias with w = q * scale + min per group; packed from `pack_int4`, scale_min from `int4_scale_min`.

    Input rows are quantized to int8 blocks as in `linear_int8`; each group's minimum meets the exact float
    sum of the input block.
    """
    lib = _loaded("linear_int4", isa)
    n, k = packed.shape[0] * TILE, packed.shape[1] // 4
    rows, y, bias, bf16 = _io(x, n, bias)
    lib.kataru_linear_int4(rows.data_ptr(), packed.data_ptr(), scale_min.data_ptr(), _pointer(bias), y.data_ptr(),
                           rows.shape[0], k, n, group_size, bf16, torch.get_num_threads())
    return _shaped(y, x)


def norm_applicable(x: Tensor, weight: Tensor) -> bool:
    """Whether few rows of x (a decode step's) can take `rms_norm` with this weight."""
    return (x.device.type == "cpu" and x.dtype in ACTIVATIONS and weight.dtype == x.dtype and available("norm")
            and usable(x, weight, "norm"))


def _rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """`model.RMSNorm` for CPU rows in float32 or bf16 with a weight of the same type, in one call."""
    lib = _loaded("rms_norm")
    rows = x.reshape(-1, x.shape[-1]).contiguous()
    out = _output(*rows.shape, dtype=rows.dtype)
    lib.kataru_rms_norm(rows.data_ptr(), weight.data_ptr(), out.data_ptr(), rows.shape[0], rows.shape[1], eps,
                        int(x.dtype == torch.bfloat16))
    return out.view(x.shape)


def attention_applicable(cache: Tensor, dtype: torch.dtype, head_dim: int) -> bool:
    """Whether a one-token decode step with activations of `dtype` can attend over this CPU cache on
    `decode_attention`."""
    return (cache.device.type == "cpu" and cache.dtype in ACTIVATIONS and dtype in ACTIVATIONS
            and head_dim % 8 == 0 and head_dim <= 512 and not torch.is_grad_enabled()
            and applicable(cache, "attention"))


def _decode_attention(qkv: Tensor, rope: Tensor | None, k_cache: Tensor, v_cache: Tensor, rows: Tensor,
                      slots: Tensor, n_head: int, window: int | None = None) -> Tensor:
    """One decode step's attention: write each row's new key (with the rotary embedding) and value into the
    cache [R, Hkv, S, D] at its slot, then softmax(q k^T / sqrt(D)) v for its query, read in place.

    qkv [B, (n_head + 2 Hkv) D], the fused projection's output; rope [4, B, rot] the cos and sin tables of
    queries and keys at each row's position (None: no rotary), in qkv's type. Row b uses cache row rows[b]
    and sees slots up to slots[b] (the last `window` of them with a sliding window). Returns [B, n_head D] in
    qkv's type; heads share kv heads in groups of n_head / Hkv. Keys and queries are rotated bit for bit as
    `model.apply_rotary` does.
    """
    lib = _loaded("decode_attention")
    b = qkv.shape[0]
    _, h_kv, s, d = k_cache.shape
    rows, slots = rows.to(torch.int64).contiguous(), slots.to(torch.int64).contiguous()
    qkv = qkv.contiguous()
    rot = 0 if rope is None else rope.shape[-1]
    tables = None if rope is None else rope.to(qkv.dtype).contiguous()
    out = _output(b, n_head * d, dtype=qkv.dtype)
    lib.kataru_decode_attention(qkv.data_ptr(), _pointer(tables), rot, k_cache.data_ptr(),
                                v_cache.data_ptr(), rows.data_ptr(), slots.data_ptr(), out.data_ptr(), b, n_head,
                                h_kv, s, d, window or 0, d**-0.5, int(qkv.dtype == torch.bfloat16),
                                int(k_cache.dtype == torch.bfloat16), torch.get_num_threads())
    return out


@contextlib.contextmanager
def disabled(*kinds: str) -> Iterator[None]:
    """torch's ops instead of these kernels (linear, attention, norm; none named: all) inside the block, for
    benchmarks that compare the two."""
    unknown = set(kinds) - set(KINDS)
    if unknown:
        raise ValueError(f"unknown kernel kind(s) {sorted(unknown)}; choose from {', '.join(KINDS)}")
    for kind in kinds or KINDS:
        _state["off"][kind] += 1
    try:
        yield
    finally:
        for kind in kinds or KINDS:
            _state["off"][kind] -= 1


@contextlib.contextmanager
def stubbed() -> Iterator[None]:
    """Every kernel call returns at once, leaving its output zero, inside the block: what a step costs besides
    its kernels (`bench/decode_overhead.py`). Only the time means anything."""
    _state["stub"] += 1
    try:
        yield
    finally:
        _state["stub"] -= 1


# The kernels as torch operators, so that torch.compile keeps them in its graph (it cannot trace a ctypes call)
# and fuses the element-wise work between them. A plain `Library` definition dispatches in ~4 us where
# `torch.library.custom_op` takes ~25 us; eager calls skip the dispatcher altogether.
_OPS = torch.library.Library("kataru", "DEF")


def _define(schema: str, fake: Callable[..., Tensor]) -> None:
    """kataru::NAME running `_NAME` on CPU tensors; `fake` gives the output's shape and dtype to the tracer."""
    name = schema.split("(")[0]
    _OPS.define(schema)
    _OPS.impl(name, lambda *args: globals()[f"_{name}"](*args), "CPU")  # looked up per call (tests wrap it)
    torch.library.register_fake(f"kataru::{name}", fake, lib=_OPS)


_define("linear_half(Tensor x, Tensor weight, Tensor? bias, str isa) -> Tensor",
        lambda x, weight, bias, isa: x.new_empty(*x.shape[:-1], weight.shape[0]))
_define("linear_packed(Tensor x, Tensor packed, Tensor? bias, str isa) -> Tensor",
        lambda x, packed, bias, isa: x.new_empty(*x.shape[:-1], packed.shape[0] * PANEL))
_define("linear_int8(Tensor x, Tensor weight, Tensor scales, Tensor? bias, bool tiled, str isa) -> Tensor",
        lambda x, weight, scales, bias, tiled, isa: x.new_empty(*x.shape[:-1], scales.shape[0]))
_define("linear_int4(Tensor x, Tensor packed, Tensor scale_min, int group_size, Tensor? bias, str isa) -> Tensor",
        lambda x, packed, scale_min, group_size, bias, isa: x.new_empty(*x.shape[:-1], packed.shape[0] * TILE))
_define("decode_attention(Tensor qkv, Tensor? rope, Tensor(a!) k_cache, Tensor(b!) v_cache, Tensor rows, Tensor slots, "
        "int n_head, int? window) -> Tensor",
        lambda qkv, rope, k_cache, v_cache, rows, slots, n_head, window:
        qkv.new_empty(qkv.shape[0], n_head * k_cache.shape[-1]))


_define("rms_norm(Tensor x, Tensor weight, float eps) -> Tensor", lambda x, weight, eps: torch.empty_like(x))


# What the model calls: each kernel directly, or its operator inside a torch.compile trace.
def linear_half(x: Tensor, weight: Tensor, bias: Tensor | None = None, isa: str = "avx2") -> Tensor:
    op = torch.ops.kataru.linear_half if torch.compiler.is_compiling() else _linear_half
    return op(x, weight, bias, isa)


def linear_packed(x: Tensor, packed: Tensor, bias: Tensor | None = None, isa: str = "avx2") -> Tensor:
    op = torch.ops.kataru.linear_packed if torch.compiler.is_compiling() else _linear_packed
    return op(x, packed, bias, isa)


def linear_int8(x: Tensor, weight: Tensor, scales: Tensor, bias: Tensor | None = None, tiled: bool = False,
                isa: str = "avx2") -> Tensor:
    op = torch.ops.kataru.linear_int8 if torch.compiler.is_compiling() else _linear_int8
    return op(x, weight, scales, bias, tiled, isa)


def linear_int4(x: Tensor, packed: Tensor, scale_min: Tensor, group_size: int, bias: Tensor | None = None,
                isa: str = "avx2") -> Tensor:
    op = torch.ops.kataru.linear_int4 if torch.compiler.is_compiling() else _linear_int4
    return op(x, packed, scale_min, group_size, bias, isa)


def decode_attention(qkv: Tensor, rope: Tensor | None, k_cache: Tensor, v_cache: Tensor, rows: Tensor, slots: Tensor,
                     n_head: int, window: int | None = None) -> Tensor:
    op = torch.ops.kataru.decode_attention if torch.compiler.is_compiling() else _decode_attention
    return op(qkv, rope, k_cache, v_cache, rows, slots, n_head, window)


def rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    op = torch.ops.kataru.rms_norm if torch.compiler.is_compiling() else _rms_norm
    return op(x, weight, eps)
