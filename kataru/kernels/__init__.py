"""Matmul kernels for CPU decoding (bf16 and int8 weights), compiled on first use with the system's C compiler.

On AVX2 CPUs without native bf16 (this project's machine), torch's bf16 matmul for a few rows streams
the weights well below the memory bandwidth, and its time grows with the number of rows: batch-8
decoding costs eight times batch 1. `linear.c` reads each weight once for every row of the batch at
close to the bandwidth, and does the same for int8 weights with per-row scales. It is built once per
source version into the user's cache (`$KATARU_CACHE`, default `~/.cache/kataru`) and loaded with
ctypes; with no compiler, no AVX2, or `KATARU_KERNELS=0`, kataru uses torch's kernels, which give the
same results up to float rounding.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import Tensor

SOURCE = Path(__file__).with_name("linear.c")
FLAGS = ("-O3", "-mavx2", "-mfma", "-fopenmp", "-fPIC", "-shared")

_state: dict[str, object] = {}  # "lib": the loaded library or None once tried; "off": disabled() depth


def cache_dir() -> Path:
    root = os.environ.get("KATARU_CACHE") or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "kataru"
    return Path(root) / "kernels"


def supported() -> bool:
    """x86-64 with AVX2 (torch's own dispatch says so) and not switched off."""
    if os.environ.get("KATARU_KERNELS", "1") == "0" or platform.machine().lower() not in ("x86_64", "amd64"):
        return False
    return torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512")


def build(source: Path = SOURCE) -> Path:
    """The shared library for `source`, compiled once into the cache (atomically: a temp file, then rename)."""
    compiler = os.environ.get("CC") or "cc"
    digest = hashlib.sha256(source.read_bytes() + " ".join((compiler, *FLAGS)).encode()).hexdigest()[:16]
    target = cache_dir() / f"{source.stem}-{digest}.so"
    if target.exists():
        return target
    if shutil.which(compiler) is None:
        raise RuntimeError(f"no C compiler ({compiler})")
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
    os.close(fd)
    try:
        run = subprocess.run([compiler, *FLAGS, str(source), "-o", tmp], capture_output=True, text=True)
        if run.returncode != 0:
            raise RuntimeError(f"{compiler} failed: {run.stderr.strip().splitlines()[-1:]}")
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target


def library() -> ctypes.CDLL | None:
    """The compiled kernels, or None where they cannot run here (decided once per process)."""
    if _state.get("off"):
        return None
    if "lib" not in _state:
        lib = None
        if supported():
            try:
                lib = ctypes.CDLL(str(build()))
                pointers, sizes = [ctypes.c_void_p] * 3, [ctypes.c_int64] * 3
                lib.kataru_linear_bf16.argtypes = [*pointers, *sizes, ctypes.c_int]
                lib.kataru_linear_int8.argtypes = [*pointers, ctypes.c_void_p, ctypes.c_void_p, *sizes, ctypes.c_int]
                lib.kataru_linear_bf16.restype = lib.kataru_linear_int8.restype = None
            except (OSError, RuntimeError, subprocess.SubprocessError) as err:
                lib = None
                if os.environ.get("KATARU_DEBUG"):
                    print(f"kataru: CPU kernels unavailable ({err}); using torch's matmul", file=sys.stderr)
        _state["lib"] = lib
    return _state["lib"]  # type: ignore[return-value]


def available() -> bool:
    return library() is not None


def applicable(weight: Tensor) -> bool:
    """Whether a CPU weight can go through the kernels now: they run here, the weight is contiguous, and no
    torch.compile trace is running (the compiler cannot see into a ctypes call)."""
    return weight.is_contiguous() and not torch.compiler.is_compiling() and available()


def _rows(x: Tensor, k: int) -> Tensor:
    return x.reshape(-1, k).float().contiguous()


def _output(y: Tensor, bias: Tensor | None, x: Tensor) -> Tensor:
    """The float32 result with the bias, rounded once to x's dtype and shaped like x."""
    if bias is not None:
        y += bias
    return y.to(x.dtype).reshape(*x.shape[:-1], y.shape[-1])


def linear_bf16(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """F.linear with a contiguous bf16 CPU weight (float32 accumulation, one rounding to x's dtype).

    The caller checks `applicable(weight)` and that no gradient is wanted.
    """
    lib = library()
    assert lib is not None, "linear_bf16 called where the kernels are unavailable"
    n, k = weight.shape
    rows = _rows(x, k)
    y = torch.empty(rows.shape[0], n, dtype=torch.float32)
    lib.kataru_linear_bf16(rows.data_ptr(), weight.data_ptr(), y.data_ptr(), rows.shape[0], k, n,
                           torch.get_num_threads())
    return _output(y, bias, x)


def linear_int8(x: Tensor, weight: Tensor, scales: Tensor, bias: Tensor | None = None) -> Tensor:
    """x @ (weight * scales[:, None]).T + bias for contiguous int8 CPU weights and float32 scales.

    Each input row is quantized to int16 with its own scale (error at most 2^-16 of its largest value, far
    below the bf16 rounding of the activations themselves), so the kernel sums products exactly in int32.
    """
    lib = library()
    assert lib is not None, "linear_int8 called where the kernels are unavailable"
    n, k = weight.shape
    rows = _rows(x, k)
    x_scales = (rows.abs().amax(dim=1) / 32767).clamp(min=torch.finfo(torch.float32).tiny)
    x16 = torch.round(rows / x_scales[:, None]).to(torch.int16)
    y = torch.empty(rows.shape[0], n, dtype=torch.float32)
    lib.kataru_linear_int8(x16.data_ptr(), x_scales.data_ptr(), weight.data_ptr(), scales.data_ptr(), y.data_ptr(),
                           rows.shape[0], k, n, torch.get_num_threads())
    return _output(y, bias, x)


@contextlib.contextmanager
def disabled() -> Iterator[None]:
    """torch's matmul instead of the kernel inside the block (benchmarks compare the two)."""
    depth = int(_state.get("off", 0))  # type: ignore[call-overload]
    _state["off"] = depth + 1
    try:
        yield
    finally:
        _state["off"] = depth
