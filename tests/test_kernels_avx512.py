"""The AVX-512 build of kataru's matmul kernels: its code on an emulated AVX-512 CPU (this project's machines
are AVX2-only; `tests/emulated`), on the real CPU where it has AVX-512, and the choice of build by cpuid.

The tiled int8 and 4-bit kernels sum exactly in integers, so their AVX-512 build must give the AVX2 build's
bits; the 16-bit float kernels sum in another order and must stay within float32 accumulation plus one
rounding, with each row's bits independent of the batch.
"""

from __future__ import annotations

import ctypes
import functools
import os
import shutil
import subprocess
from pathlib import Path

import emulated
import pytest
import torch

from kataru import kernels
from kataru.model import Linear

needs_avx2 = pytest.mark.skipif(not kernels.available(), reason="kataru's AVX2 kernels do not run here (the "
                                                                "reference for the AVX-512 build)")


@functools.cache
def emulator_or_reason() -> str | None:
    if shutil.which("cc") is None or shutil.which("nm") is None:
        return "no C compiler or binutils to build the kernels for the emulator"
    try:
        emulated.bochscpu()
    except ImportError as err:  # an x86-64 Linux wheel only
        return f"bochscpu-python (the emulated AVX-512 CPU) cannot load here: {err}"
    return None


needs_emulator = pytest.mark.skipif(emulator_or_reason() is not None, reason=str(emulator_or_reason()))


@pytest.fixture(scope="module")
def program(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return emulated.build(tmp_path_factory.mktemp("avx512") / "linear-avx512")


def run_emulated(program: Path, name: str, tensors: list[torch.Tensor], sizes: list[int], out: torch.Tensor
                 ) -> torch.Tensor:
    """`name(*tensors, 0 (no bias), out, *sizes, float32 activations, one thread)` on a fresh emulated CPU."""
    return emulated.Machine(program).linear(name, tensors, sizes, out)


def rows_of(rows: int, k: int, seed: int) -> torch.Tensor:
    return torch.randn(rows, k, generator=torch.Generator().manual_seed(seed))


@needs_emulator
def test_the_program_is_the_512_bit_code(program: Path) -> None:
    code = subprocess.run(["objdump", "-d", str(program)], capture_output=True, text=True).stdout
    assert code.count("zmm") > 100  # wide loads, FMAs and integer dot products


@needs_emulator
@needs_avx2
@pytest.mark.parametrize("rows", [1, 2, 3, 5, 8, 9])
def test_int4_tiles_give_the_avx2_bits(program: Path, rows: int) -> None:
    n, k, group = 64, 256, 128
    g = torch.Generator().manual_seed(rows)
    q = torch.randint(0, 16, (n, k), generator=g)
    scale_min = kernels.int4_scale_min(torch.rand(n, k // group, generator=g) * 0.1,
                                       -torch.rand(n, k // group, generator=g))
    packed, x = kernels.pack_int4(q), rows_of(rows, k, rows)
    got = run_emulated(program, "kataru_linear_int4", [x, packed, scale_min], [rows, k, n, group],
                       torch.empty(rows, n))
    assert torch.equal(got, kernels.linear_int4(x, packed, scale_min, group))


@needs_emulator
@needs_avx2
@pytest.mark.parametrize("rows", [1, 3, 4, 6])
def test_int8_tiles_give_the_avx2_bits(program: Path, rows: int) -> None:
    n, k = 48, 320
    q = torch.randint(-127, 128, (n, k), generator=torch.Generator().manual_seed(rows), dtype=torch.int8)
    tiled, scales, x = kernels.tile_int8(q), torch.rand(n) * 0.01, rows_of(rows, k, rows)
    got = run_emulated(program, "kataru_linear_int8_tiled", [x, tiled, scales], [rows, k, n], torch.empty(rows, n))
    assert torch.equal(got, kernels.linear_int8(x, tiled, scales, tiled=True))


@needs_emulator
@pytest.mark.parametrize("k", [256, 269, 13])  # 16-wide steps only; then an 8-wide step and a tail; tail only
@pytest.mark.parametrize("dtype,name", [(torch.bfloat16, "kataru_linear_bf16"), (torch.float16, "kataru_linear_f16")])
def test_16_bit_weights_within_float32_sums_and_batch_invariant(program: Path, k: int, dtype: torch.dtype,
                                                                name: str) -> None:
    """As test_kernels' bound: k products summed in float32 err by at most k 2^-24 sum|x w| (float32 out)."""
    n, rows = 40, 5
    w = (rows_of(n, k, 1) * 0.1).to(dtype)
    x = rows_of(rows, k, 2)
    got = run_emulated(program, name, [x, w], [rows, k, n], torch.empty(rows, n))
    exact = x.double() @ w.double().t()
    bound = k * 2**-24 * (x.double().abs() @ w.double().abs().t())
    assert ((got.double() - exact).abs() <= bound * 1.01).all()
    alone = run_emulated(program, name, [x[3:4], w], [1, k, n], torch.empty(1, n))
    assert torch.equal(alone, got[3:4])  # a row's bits do not depend on its batch


@pytest.fixture(scope="module")
def vnni_program(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return emulated.build(tmp_path_factory.mktemp("vnni") / "linear-vnni", (*kernels.AVX512, "-mavx512vnni"))


def int_operands(kind: str, rows: int) -> tuple[str, list[torch.Tensor], list[int], torch.Tensor]:
    """(function, tensors, sizes, the AVX2 build's output) of a tiled int8 or 4-bit call."""
    n, k = 64, 256
    g = torch.Generator().manual_seed(rows)
    x = torch.randn(rows, k, generator=g)
    if kind == "int4":
        packed = kernels.pack_int4(torch.randint(0, 16, (n, k), generator=g))
        scale_min = kernels.int4_scale_min(torch.rand(n, 4, generator=g), -torch.rand(n, 4, generator=g))
        return ("kataru_linear_int4", [x, packed, scale_min], [rows, k, n, 64],
                kernels.linear_int4(x, packed, scale_min, 64))
    tiled = kernels.tile_int8(torch.randint(-127, 128, (n, k), generator=g, dtype=torch.int8))
    scales = torch.rand(n, generator=g) * 0.01
    return "kataru_linear_int8_tiled", [x, tiled, scales], [rows, k, n], kernels.linear_int8(x, tiled, scales,
                                                                                             tiled=True)


@needs_emulator
def test_the_emulated_cpu_refuses_what_it_lacks(vnni_program: Path) -> None:
    """The emulated Cannon Lake has no VNNI: the VNNI build stops on its first vpdpbusd (#UD), which shows that
    the emulator checks instruction sets (a pass above means the AVX-512 code really ran) and that the VNNI
    build really uses them."""
    name, tensors, sizes, _ = int_operands("int4", 1)
    with pytest.raises(RuntimeError, match="CPU exception 6"):
        run_emulated(vnni_program, name, tensors, sizes, torch.empty(1, 64))


@needs_emulator
@needs_avx2
@pytest.mark.parametrize("rows", [1, 3, 8, 9])
@pytest.mark.parametrize("kind", ["int4", "int8"])
def test_the_vnni_build_gives_the_avx2_bits(vnni_program: Path, kind: str, rows: int) -> None:
    """The VNNI build on the emulated CPU, each vpdpbusd done by the test as Intel's manual defines it
    (`Machine._lacking`; the rest of the build runs on the emulated CPU)."""
    name, tensors, sizes, expected = int_operands(kind, rows)
    machine = emulated.Machine(vnni_program)
    got = machine.linear(name, tensors, sizes, torch.empty(rows, 64), lacking=True)
    products = rows * 64 * 256 // 64  # every multiply-add in one, 64 per instruction
    weight_sums = 0 if kind == "int4" else 64 * 256 // 64 * -(-rows // 4)  # int8: per group of 4 rows, x + 128
    assert machine.done == {"vpdpbusd": products + weight_sums}
    assert torch.equal(got, expected)


@pytest.fixture(scope="module")
def bf16_program(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The build a CPU with AVX512-BF16 gets (Sapphire Rapids, Zen 4): VNNI and BF16 too."""
    return emulated.build(tmp_path_factory.mktemp("bf16") / "linear-bf16",
                          (*kernels.AVX512, "-mavx512vnni", "-mavx512bf16"))


@needs_emulator
@pytest.mark.parametrize("k", [256, 269, 40])  # 32-wide steps only; then 8-wide and a tail; one 8-wide step
def test_the_bf16_build_sums_x_rounded_to_bf16_by_vdpbf16ps(bf16_program: Path, k: int) -> None:
    """bf16 weights meet the input rounded to bf16 (to nearest even, as torch rounds): against that input
    the result errs only by float32 sums, every weight pair of the 32-wide steps goes through vdpbf16ps (done
    by the test, as Intel's manual defines it), and a row's bits do not depend on its batch."""
    n, rows = 24, 5
    w, x = (rows_of(n, k, 1) * 0.1).bfloat16(), rows_of(rows, k, 2)
    machine = emulated.Machine(bf16_program)
    got = machine.linear("kataru_linear_bf16", [x, w], [rows, k, n], torch.empty(rows, n), lacking=True).double()
    assert machine.done.get("vdpbf16ps", 0) == rows * n * (k // 32)  # 32 multiply-adds per instruction
    xr = x.bfloat16().double()
    exact = xr @ w.double().t()
    assert ((got - exact).abs() <= k * 2**-24 * (xr.abs() @ w.double().abs().t()) * 1.01).all()
    if k >= 32:  # not the float32 x: its products differ past bf16's precision
        assert not torch.allclose(got, x.double() @ w.double().t(), rtol=0, atol=k * 2**-24)
    alone = emulated.Machine(bf16_program).linear("kataru_linear_bf16", [x[3:4], w], [1, k, n], torch.empty(1, n),
                                                  lacking=True)
    assert torch.equal(alone.double(), got[3:4])


@needs_emulator
@pytest.mark.parametrize("k", [256, 269, 1])  # pairs of steps only; then an odd last step (and a rounding tail)
def test_the_bf16_build_sums_packed_panels_by_vdpbf16ps(bf16_program: Path, k: int) -> None:
    """The packed layout in the BF16 build: each pair of a panel's steps is one vdpbf16ps per input row (the
    odd K's last step paired with zeros), the input rounded to bf16 as torch rounds it (16 at a time, then
    the tail), the result within float32 sums of that, the same bits alone as batched."""
    n, rows = 48, 5
    w, x = (rows_of(n, k, 1) * 0.1).bfloat16(), rows_of(rows, k, 2)
    packed = kernels.pack_bf16(w)
    machine = emulated.Machine(bf16_program)
    got = machine.linear("kataru_linear_bf16_packed", [x, packed], [rows, k, n], torch.empty(rows, n),
                         lacking=True).double()
    assert machine.done.get("vdpbf16ps", 0) == rows * (n // 16) * ((k + 1) // 2)
    xr = x.bfloat16().double()
    exact = xr @ w.double().t()
    assert ((got - exact).abs() <= k * 2**-24 * (xr.abs() @ w.double().abs().t()) * 1.01).all()
    alone = emulated.Machine(bf16_program).linear("kataru_linear_bf16_packed", [x[3:4], packed], [1, k, n],
                                                  torch.empty(1, n), lacking=True)
    assert torch.equal(alone.double(), got[3:4])
    if "bf16" in kernels.extensions("avx512"):  # Intel's definition, this CPU
        assert torch.equal(got.float(), kernels.linear_packed(x, packed, isa="avx512"))


@pytest.mark.skipif(not kernels.available(isa="avx512"),
                    reason=f"this CPU lacks AVX-512 (F, BW, VL and DQ), has "
                           f"{' '.join(sorted(f for f in kernels.cpu_flags() if f.startswith('avx'))) or 'no AVX'}; "
                           "the build ran on the emulated CPU above")
@torch.inference_mode()
def test_the_avx512_build_on_this_cpu() -> None:
    x, n, k = rows_of(6, 256, 0), 64, 256
    q4 = torch.randint(0, 16, (n, k), generator=torch.Generator().manual_seed(0))
    packed, scale_min = kernels.pack_int4(q4), kernels.int4_scale_min(torch.rand(n, 4) * 0.1, -torch.rand(n, 4))
    assert torch.equal(kernels.linear_int4(x, packed, scale_min, 64, isa="avx512"),
                       kernels.linear_int4(x, packed, scale_min, 64))
    q8 = kernels.tile_int8(torch.randint(-127, 128, (n, k), dtype=torch.int8))
    scales = torch.rand(n) * 0.01
    assert torch.equal(kernels.linear_int8(x, q8, scales, tiled=True, isa="avx512"),
                       kernels.linear_int8(x, q8, scales, tiled=True))
    built = kernels.extensions("avx512")  # what the compiler could build of what the CPU has
    assert set(built) <= {name for name in ("vnni", "bf16") if f"avx512_{name}" in kernels.cpu_flags()}
    w = (rows_of(n, k, 1) * 0.1).bfloat16()
    xr = x.bfloat16().float() if "bf16" in built else x  # vdpbf16ps takes x in bf16
    exact = xr.double() @ w.double().t()
    got = kernels.linear_half(x, w, isa="avx512").double()
    assert ((got - exact).abs() <= k * 2**-24 * (xr.double().abs() @ w.double().abs().t()) * 1.01).all()
    layer = Linear(k, n).bfloat16().requires_grad_(False)
    assert layer.default_path(x.bfloat16(), 1) == "kernel-avx512"  # cpuid's choice without a plan
    packed = kernels.pack_bf16(w)  # the packed layout's AVX-512 build: within float32 sums, batch invariant
    got = kernels.linear_packed(x, packed, isa="avx512")
    assert ((got.double() - exact).abs() <= k * 2**-24 * (xr.double().abs() @ w.double().abs().t()) * 1.01).all()
    assert torch.equal(torch.cat([kernels.linear_packed(x[i:i + 1], packed, isa="avx512") for i in range(6)]), got)
    assert torch.equal(kernels.linear_packed(x.bfloat16(), packed, isa="avx512"), got.bfloat16()) == \
        ("bf16" in built)  # with BF16 a bf16 input is the float32 one rounded first


def test_the_build_is_chosen_by_cpuid(monkeypatch: pytest.MonkeyPatch) -> None:
    flags = {"avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512dq"}
    monkeypatch.setattr(kernels, "cpu_flags", lambda: frozenset(flags))
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX512")
    monkeypatch.setattr(kernels.platform, "machine", lambda: "x86_64")
    avx512 = (*kernels.FLAGS, "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq")
    assert kernels.supported("avx512") and kernels.isa_flags("avx512") == [avx512]
    flags |= {"avx512_vnni", "avx512_bf16"}  # Sapphire Rapids, Zen 4: those too, and without them for old compilers
    assert kernels.isa_flags("avx512") == [(*avx512, "-mavx512vnni", "-mavx512bf16"), avx512]
    monkeypatch.setenv("KATARU_KERNEL_ISA", "avx2")
    assert not kernels.supported("avx512") and kernels.supported("avx2")
    monkeypatch.delenv("KATARU_KERNEL_ISA")
    flags.discard("avx512bw")  # Knights Landing: AVX-512F without BW
    assert not kernels.supported("avx512")
    flags.add("avx512bw")
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX2")  # the OS does not save zmm
    assert not kernels.supported("avx512")


def compiler_refusing(flag: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """$CC: the system's compiler, but an error for any command line with `flag`; the kernel cache empty."""
    cc = tmp_path / "cc"
    cc.write_text(f"#!/bin/sh\ncase \"$*\" in *{flag}*) echo 'unknown {flag}' >&2; exit 1;; esac\n"
                  f"exec {shutil.which('cc')} \"$@\"\n")
    cc.chmod(0o755)
    monkeypatch.setenv("CC", str(cc))
    monkeypatch.setenv("KATARU_CACHE", str(tmp_path / "cache"))


@needs_avx2
def test_a_compiler_without_avx512_leaves_the_avx2_build(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """A missing instruction set is never an error: a compiler that rejects -mavx512f leaves "kernel"."""
    compiler_refusing("-mavx512f", monkeypatch, tmp_path)
    monkeypatch.setattr(kernels, "_state", {"lib": {}, "off": dict.fromkeys(kernels.KINDS, 0), "stub": 0})
    supported = kernels.supported
    monkeypatch.setattr(kernels, "supported", lambda isa="avx2": True if isa == "avx512" else supported(isa))
    assert kernels.library("avx512") is None and kernels.library("avx2") is not None
    assert kernels.isas() == ["avx2"]
    layer = Linear(64, 48).bfloat16().requires_grad_(False)
    x = torch.randn(2, 64).bfloat16()
    assert layer.default_path(x, 2) == "kernel" and not layer.can_run("kernel-avx512", x)
    assert torch.equal(layer(x), kernels.linear_half(x, layer.weight, layer.bias))
    assert os.listdir(tmp_path / "cache" / "kernels") and all(
        name.endswith(".so") for name in os.listdir(tmp_path / "cache" / "kernels"))  # no temp files left


def test_a_compiler_without_bf16_builds_avx512_without_it(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """An older compiler that knows AVX-512 but not -mavx512bf16 still builds the AVX-512 build, without BF16."""
    compiler_refusing("-mavx512bf16", monkeypatch, tmp_path)
    monkeypatch.setattr(kernels, "cpu_flags", lambda: frozenset({"avx512_vnni", "avx512_bf16"}))
    full, plain = kernels.isa_flags("avx512")
    assert "-mavx512bf16" in full
    built = kernels.build_any([full, plain])
    assert built == kernels.build(flags=plain) and built.exists()  # the second set, already in the cache
    if torch.backends.cpu.get_cpu_capability() == "AVX512":  # it runs here: it says it has neither (kataru info)
        assert ctypes.CDLL(str(built)).kataru_extensions() == 0
    assert os.listdir(tmp_path / "cache" / "kernels") == [built.name]
