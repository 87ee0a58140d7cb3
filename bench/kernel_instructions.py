"""Instructions per weight of kataru's matmul kernels, AVX2 build beside AVX-512 builds, on an emulated CPU.

No AVX-512 machine is at hand, so their speed cannot be timed here; what can be counted is the work each
build asks of the CPU. The builds of `kataru/kernels/linear.c` run on the same emulated core (`tests/emulated`:
Bochs, a Cannon Lake with AVX2 and AVX-512 F/BW/VL/DQ, no VNNI) on one weight shape per kind, one thread, and
every instruction executed is counted; so is the build a CPU with VNNI and AVX512-BF16 gets, whose `vpdpbusd`
and `vdpbf16ps` the harness does outside the emulator (counted one each; slow: a stop and a resume each).
Fewer instructions per weight matter where a kernel is bound by compute (decode batches of several rows); at
one row decoding is bound by memory bandwidth, which no instruction set changes. This is not a timing: a real
CPU may run 512-bit instructions at a lower clock, which is why kataru's plan times the builds on the user's
CPU before it picks one.

usage: .venv/bin/python bench/kernel_instructions.py [--rows 1,8,32] [--out 1024] [--in 1024]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
import emulated

from kataru import kernels


def operands(kind: str, rows: int, n: int, k: int) -> tuple[str, list[torch.Tensor], list[int]]:
    """(function, tensors before the bias, sizes after the output) of one call of a kind."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(rows, k, generator=g)
    if kind in ("bf16", "fp16"):
        w = (torch.randn(n, k, generator=g) * 0.1).to(torch.bfloat16 if kind == "bf16" else torch.float16)
        return f"kataru_linear_{'bf16' if kind == 'bf16' else 'f16'}", [x, w], [rows, k, n]
    if kind == "int8":
        q = torch.randint(-127, 128, (n, k), generator=g, dtype=torch.int8)
        return "kataru_linear_int8_tiled", [x, kernels.tile_int8(q), torch.rand(n, generator=g)], [rows, k, n]
    q = torch.randint(0, 16, (n, k), generator=g)
    scale_min = kernels.int4_scale_min(torch.rand(n, k // 64, generator=g), torch.rand(n, k // 64, generator=g))
    return "kataru_linear_int4", [x, kernels.pack_int4(q), scale_min], [rows, k, n, 64]


def count(program: Path, kind: str, rows: int, n: int, k: int) -> int:
    name, tensors, sizes = operands(kind, rows, n, k)
    machine = emulated.Machine(program)
    machine.linear(name, tensors, sizes, torch.empty(rows, n), count=True, lacking=True)
    return machine.executed + sum(machine.done.values())  # vpdpbusd and vdpbf16ps, done outside the emulator


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", default="1,8,32")
    parser.add_argument("--out", type=int, default=1024, help="output features (a multiple of 8)")
    parser.add_argument("--in", dest="inner", type=int, default=1024, help="input features (a multiple of 64)")
    args = parser.parse_args()
    folder = Path(tempfile.mkdtemp())
    builds = {"AVX2": emulated.build(folder / "avx2", ()), "AVX-512": emulated.build(folder / "avx512"),
              "+VNNI+BF16": emulated.build(folder / "full", (*kernels.AVX512, "-mavx512vnni", "-mavx512bf16"))}
    n, k = args.out, args.inner
    print(f"instructions per weight, {n}x{k} weights, one thread, emulated Cannon Lake (AVX-512 F/BW/VL/DQ; "
          "VNNI's and BF16's dot products done outside the emulator, one instruction each)\n")
    print("| weights | rows | AVX2 | AVX-512 | AVX-512 + VNNI + BF16 | ratios to AVX2 |")
    print("|---|---|---|---|---|---|")
    for kind in ("bf16", "fp16", "int8", "int4"):
        for rows in (int(r) for r in args.rows.split(",")):
            per = {build: count(program, kind, rows, n, k) / (n * k) for build, program in builds.items()}
            print(f"| {kind} | {rows} | {per['AVX2']:.3f} | {per['AVX-512']:.3f} | {per['+VNNI+BF16']:.3f} | "
                  f"{per['AVX-512'] / per['AVX2']:.2f} / {per['+VNNI+BF16'] / per['AVX2']:.2f} |", flush=True)


if __name__ == "__main__":
    main()
