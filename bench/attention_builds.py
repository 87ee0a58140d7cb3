"""The decode-attention kernel of this checkout against the one of another git revision, in one process, the two
builds taking turns on the same caches: µs per call and the keys' and values' read rate, cold (24 layers' caches
in turn, as a decode step meets them after the weights have streamed through) and warm (one layer's cache over
and over).

usage: .venv/bin/python bench/attention_builds.py [--against HEAD~1] [--batch 8] [--contexts 64,192,250]
                                                  [--heads 16] [--head-dim 128] [--reps 12]
The best of --reps rounds per build is printed (the machine's load only ever adds time).
"""

from __future__ import annotations

import argparse
import ctypes
import subprocess
import tempfile
import time
from pathlib import Path

import torch

from kataru import kernels

LAYERS = 24


def build_of(revision: str | None, folder: Path) -> ctypes.CDLL:
    """The AVX2 library of the working tree (None) or of `revision`'s kernel sources."""
    if revision is None:
        lib = ctypes.CDLL(str(kernels.build()))
    else:  # compiled here, not through kernels.build, whose cache key reads this checkout's header
        for name in (*(s.name for s in kernels.SOURCES), kernels.HEADER.name):
            text = subprocess.run(["git", "show", f"{revision}:kataru/kernels/{name}"], capture_output=True,
                                  check=True).stdout
            (folder / name).write_bytes(text)
        target = folder / "kataru.so"
        subprocess.run(["cc", *kernels.FLAGS, *(str(folder / s.name) for s in kernels.SOURCES), "-o", str(target),
                        "-lm"], check=True)
        lib = ctypes.CDLL(str(target))
    pointer, size, flag = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
    lib.kataru_decode_attention.argtypes = [*[pointer] * 2, size, *[pointer] * 5, *[size] * 6, ctypes.c_float,
                                            flag, flag, flag]
    lib.kataru_decode_attention.restype = None
    return lib


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--against", default="HEAD~1", help="the git revision to compare with")
    parser.add_argument("--batch", type=int, default=8, help="rows decoding together")
    parser.add_argument("--contexts", default="64,192,250", help="keys each row attends over")
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--reps", type=int, default=12)
    args = parser.parse_args()
    contexts = [int(c) for c in args.contexts.split(",")]
    b, h, d, slots = args.batch, args.heads, args.head_dim, max(contexts) + 8
    with tempfile.TemporaryDirectory() as folder:
        builds = {"this checkout": build_of(None, Path(folder)), args.against: build_of(args.against, Path(folder))}
    g = torch.Generator().manual_seed(0)
    caches = [tuple(torch.randn(b, h, slots, d, generator=g).bfloat16() for _ in "kv") for _ in range(LAYERS)]
    qkv = torch.randn(b, 3 * h * d, generator=g).bfloat16()
    rope = torch.randn(4, b, d, generator=g).bfloat16()
    rows, out = torch.arange(b), torch.empty(b, h * d, dtype=torch.bfloat16)

    def step(lib: ctypes.CDLL, layers: list, positions: torch.Tensor) -> float:
        start = time.perf_counter()
        for k, v in layers:
            lib.kataru_decode_attention(qkv.data_ptr(), rope.data_ptr(), d, k.data_ptr(), v.data_ptr(),
                                        rows.data_ptr(), positions.data_ptr(), out.data_ptr(), b, h, h, slots, d, 0,
                                        d**-0.5, 1, 1, torch.get_num_threads())
        return (time.perf_counter() - start) / len(layers)

    print(f"decode attention, bf16, {b} rows x {h} heads of {d}, {torch.get_num_threads()} threads: µs per call "
          f"(keys and values read, GB/s)")
    print(f"{'context':>8} {'caches':>6}  " + "  ".join(f"{name:>22}" for name in builds) + "   ratio")
    for context in contexts:
        positions = torch.full((b,), context - 1)
        for mode, layers in (("cold", caches), ("warm", caches[:1] * LAYERS)):
            best = dict.fromkeys(builds, float("inf"))
            for _ in range(args.reps):
                for name, lib in builds.items():
                    step(lib, layers, positions)
                    best[name] = min(best[name], step(lib, layers, positions))
            nbytes = 2 * b * h * context * d * 2
            cells = [f"{s * 1e6:9.0f} ({nbytes / s / 1e9:5.1f} GB/s)" for s in best.values()]
            this, other = best.values()
            print(f"{context:>8} {mode:>6}  " + "  ".join(f"{c:>22}" for c in cells) + f"   {other / this:.2f}x")


if __name__ == "__main__":
    main()
