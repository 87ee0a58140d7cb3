"""kataru's kernels built for instruction sets this CPU may lack, run on an emulated x86-64 CPU.

The AVX-512 build of `kataru/kernels/linear.c` cannot run on an AVX2 machine, and CI has no other. Bochs
(through bochscpu-python) emulates a Cannon Lake core: AVX-512 F, BW, VL and DQ, but not VNNI or BF16. The
kernel source is compiled with the AVX-512 flags into a static program with no C library (`runtime.c` gives
it malloc and two libm functions; `__thread` becomes plain static, OpenMP pragmas are ignored: one thread),
its segments are mapped into the emulator's memory, and an exported function is called with the System V
calling convention; it returns into a `hlt`, which ring 3 turns into the #GP that ends the run. The VNNI
and AVX512-BF16 builds run too: each of their `vpdpbusd` and `vdpbf16ps` (which the emulated CPU refuses with
#UD) is decoded (EVEX, a register or memory operand), done in Python on the stopped CPU's registers and
memory, and the run resumes after it.

bochscpu-python's wheel names two glibc 2.38 functions (`__isoc23_sscanf`, `__isoc23_strtoull`); on an older
glibc a two-line shim, compiled here, maps them to the classic ones before the module loads.
"""

from __future__ import annotations

import ctypes
import shutil
import struct
import subprocess
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from kataru import kernels

PAGE = 4096
HERE = Path(__file__).parent
KERNELS = HERE.parent.parent / "kataru" / "kernels"
STACK = 0x7F0000000  # top of a 256 KiB stack
HALT = 0x600000  # the return address: a page holding one hlt
DATA = 0x10000000  # the tests' tensors
SHIM = r"""
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
int __isoc23_sscanf(const char *s, const char *f, ...) { va_list a; va_start(a, f); int r = vsscanf(s, f, a); va_end(a); return r; }
unsigned long long __isoc23_strtoull(const char *s, char **e, int b) { return strtoull(s, e, b); }
"""


def bochscpu():  # type: ignore[no-untyped-def]
    """The bochscpu module, or ImportError saying why it cannot load here."""
    try:
        import bochscpu as module
    except ImportError as err:
        if "__isoc23" not in str(err) or shutil.which("cc") is None:
            raise
        shim = Path(tempfile.mkdtemp()) / "isoc23.so"
        subprocess.run(["cc", "-shared", "-fPIC", "-x", "c", "-", "-o", str(shim)], input=SHIM, text=True,
                       check=True)
        ctypes.CDLL(str(shim), mode=ctypes.RTLD_GLOBAL)
        import bochscpu as module
    import bochscpu.cpu
    import bochscpu.memory
    return module


def build(target: Path, flags: tuple[str, ...] = kernels.AVX512) -> Path:
    """linear.c with `flags` as a static program for the emulator (the same flags kataru's build uses)."""
    base = [f for f in kernels.FLAGS if f not in ("-fopenmp", "-fPIC", "-shared")]
    run = subprocess.run(["cc", *base, *flags, "-D__thread=", "-Wno-unknown-pragmas", "-fno-stack-protector",
                          "-fno-pie", "-no-pie", "-nostdlib", "-static", "-Wl,--build-id=none",
                          "-Wl,-e,kataru_linear_bf16", str(KERNELS / "linear.c"), str(HERE / "runtime.c"),
                          "-o", str(target)], capture_output=True, text=True)
    if run.returncode:
        raise RuntimeError(run.stderr)
    return target


def dpbusd(acc: Tensor, a: Tensor, b: Tensor) -> Tensor:
    """vpdpbusd on 64 bytes each: every 32-bit lane of acc plus the four products of a's unsigned and b's
    signed bytes, wrapping (no saturation); as uint64 words."""
    products = a.to(torch.int64) * b.view(torch.int8).to(torch.int64)
    total = acc.view(torch.int32).to(torch.int64) + products.reshape(16, 4).sum(1)
    return ((total + 2**31) % 2**32 - 2**31).to(torch.int32).view(torch.uint64)


def dpbf16ps(acc: Tensor, a: Tensor, b: Tensor) -> Tensor:
    """vdpbf16ps on 64 bytes each: every float32 lane of acc plus the product of its odd pair of bf16 values,
    rounded to nearest even, then plus the even pair's product, rounded again; bf16 subnormal inputs read as
    zero and subnormal results are flushed to zero (the manual's DAZ, FTZ and RNE, whatever MXCSR says)."""

    def flushed(x: Tensor) -> Tensor:
        return torch.where(x.abs() < torch.finfo(torch.float32).tiny, torch.zeros_like(x), x)

    x = flushed(a.view(torch.bfloat16).float()).reshape(16, 2)  # products of two bf16 values are exact in float32
    y = flushed(b.view(torch.bfloat16).float()).reshape(16, 2)
    total = flushed(acc.view(torch.float32) + x[:, 1] * y[:, 1])
    return flushed(total + x[:, 0] * y[:, 0]).view(torch.uint64)


def as_bytes(register: Any) -> Tensor:
    """A zmm register's 64 bytes (bochscpu gives its eight 64-bit words)."""
    return torch.tensor(register.q, dtype=torch.uint64).view(torch.uint8)


LACKING = {(1, 0x50): "vpdpbusd", (2, 0x52): "vdpbf16ps"}  # (EVEX pp: 66 / F3, opcode in 0F38)


class Machine:
    """One emulated CPU with the program's segments, a stack and a data area mapped; `call` runs a function.
    bochscpu's guest memory is global to the process: use one Machine at a time (a new one maps its own pages
    over the last one's)."""

    def __init__(self, program: Path) -> None:
        self.bx = bochscpu()
        blob = program.read_bytes()
        self.pages: dict[int, int] = {}
        self.table = self.bx.memory.PageMapLevel4Table()
        self.segments = []
        self.committed = False
        phoff, = struct.unpack_from("<Q", blob, 0x20)
        size, count = struct.unpack_from("<HH", blob, 0x36)
        for i in range(count):
            kind, _, offset, vaddr, _, filesz, memsz, _ = struct.unpack_from("<IIQQQQQQ", blob, phoff + i * size)
            if kind == 1:  # PT_LOAD
                self._map(vaddr, memsz)
                self.segments.append((vaddr, blob[offset:offset + filesz]))
        symbols = subprocess.run(["nm", str(program)], capture_output=True, text=True, check=True).stdout
        self.symbols = {name: int(addr, 16) for addr, _, name in (line.split() for line in symbols.splitlines()
                                                                   if len(line.split()) == 3)}
        self._map(STACK - 64 * PAGE, 64 * PAGE)
        self._map(HALT, PAGE)
        self.free = DATA
        self.pml4 = 0x100000
        self.done: dict[str, int] = {}  # the instructions `_lacking` did, by name
        self.executed = 0  # the instructions the last `linear` counted

    def _map(self, address: int, size: int) -> None:
        for page in range(address & ~(PAGE - 1), address + size, PAGE):
            if page not in self.pages:
                host = self.bx.memory.allocate_host_page()
                self.bx.memory.page_insert(page, host)
                self.table.insert(page, page, 1)
                self.pages[page] = host
                self.committed = False

    def _commit(self) -> None:
        """The page tables written out for the pages mapped so far (again only after new ones)."""
        if self.committed:
            return
        self.committed = True
        for host, guest in self.table.commit(self.pml4):
            self.bx.memory.page_insert(guest, host)
        for vaddr, data in self.segments:
            self.write(vaddr, data)
        self.segments = []  # written once: .data and .bss then live on across calls, as in a process
        self.write(HALT, b"\xf4")

    def write(self, address: int, data: bytes) -> None:
        assert self.bx.memory.virt_write(self.pml4, address, bytearray(data))

    def read(self, address: int, size: int) -> bytes:
        return bytes(self.bx.memory.virt_read(self.pml4, address, size))

    def put(self, tensor: Tensor) -> int:
        """A copy of a CPU tensor in the emulator's memory; its address."""
        data = tensor.contiguous().view(torch.uint8).numpy().tobytes()
        address = self.free
        self._map(address, len(data) + 64)
        self.free = (address + len(data) + 127) & ~63
        self._commit()
        self.write(address, data)
        return address

    def get(self, address: int, like: Tensor) -> Tensor:
        data = self.read(address, like.numel() * like.element_size())
        return torch.frombuffer(bytearray(data), dtype=like.dtype).reshape(like.shape).clone()

    def linear(self, name: str, tensors: list[Tensor], sizes: list[int], out: Tensor, **options: bool) -> Tensor:
        """kataru's `name(*tensors, no bias, out, *sizes, float32 activations, one thread)`: the output filled.
        `options` go to `call`; the instructions it counted are in `executed`."""
        pointers = [self.put(t) for t in tensors]
        y = self.put(out)
        self.executed = self.call(name, *pointers, 0, y, *sizes, 0, 1, **options)
        return self.get(y, out)

    def call(self, name: str, *args: int, count: bool = False, lacking: bool = False) -> int:
        """Run `name(*args)` (integers and pointers) to its return; with `count`, return the number of
        instructions it executed (a Python callback per instruction: slow), else 0. With `lacking`, each
        vpdpbusd (VNNI) or vdpbf16ps (AVX512-BF16), which the emulated CPU lacks, stops the run, is done here
        (`_lacking`) and the run goes on after it."""
        bx = self.bx
        self._commit()
        state = bx.State()
        bx.cpu.set_long_mode(state)
        cr4 = bx.cpu.ControlRegister(state.cr4)
        cr4.OSFXSR = cr4.OSXMMEXCPT = cr4.OSXSAVE = True  # SSE, and XSAVE state for AVX and AVX-512
        state.cr4 = int(cr4)
        state.xcr0 = 0xE7  # x87, SSE, AVX, opmask, ZMM_Hi256, Hi16_ZMM
        state.mxcsr = 0x1F80
        state.cr3 = self.pml4
        spilled = [a & (2**64 - 1) for a in args[6:]]
        base = (STACK - 256 - 8 * len(spilled)) & ~15  # rsp + 8 is 16-aligned at entry
        self.write(base - 8, struct.pack(f"<{1 + len(spilled)}Q", HALT, *spilled))
        for register, value in zip(("rdi", "rsi", "rdx", "rcx", "r8", "r9"), args[:6], strict=False):
            setattr(state, register, value & (2**64 - 1))
        state.rsp, state.rip = base - 8, self.symbols[name]
        code, data = bx.Segment(), bx.Segment()
        for segment, selector, attr in ((code, 0x33, 0x22FB), (data, 0x2B, 0xCF3)):  # 64-bit ring 3
            segment.present, segment.selector, segment.base, segment.limit, segment.attr = \
                True, selector, 0, 0xFFFFFFFF, attr
        state.cs = code
        state.ds = state.ss = state.es = state.fs = state.gs = data
        session = bx.Session()
        session.missing_page_handler = self._missing
        session.cpu.state = state
        fault: list[tuple[int, int]] = []
        hook = bx.Hook()
        hook.exception = lambda s, cpu, vector, error: (fault.append((vector, s.cpu.rip)), s.stop())
        executed = [0]
        if count:
            hook.after_execution = lambda s, cpu, instruction: executed.__setitem__(0, executed[0] + 1)
        session.run([hook])
        vector, rip = fault[0] if fault else (None, 0)
        while lacking and vector == 6 and self._lacking(session, rip):
            fault.clear()
            session.run([hook])
            vector, rip = fault[0] if fault else (None, 0)
        if not (vector == 13 and HALT <= rip <= HALT + 1):  # the hlt at the return address, or a real fault
            raise RuntimeError(f"{name}: CPU exception {vector} at {rip:#x} (6: an instruction this CPU lacks)")
        return executed[0]

    def _lacking(self, session: Any, end: int) -> bool:
        """Do the `vpdpbusd` or `vdpbf16ps` (512-bit, no mask; its second source a register or memory) that ends
        at `end` (Bochs reports a #UD after the instruction) on the stopped CPU's registers, as Intel's manual
        defines it, and resume after it. False when the bytes there are neither."""
        state = session.cpu.state
        decoded = next(filter(None, (self._decode(state, end - size, end) for size in range(6, 16))), None)
        if decoded is None:
            return False
        name, dest, first, second = decoded
        zmm = state.zmm
        register = zmm[dest]
        register.q = (dpbusd if name == "vpdpbusd" else dpbf16ps)(as_bytes(register), as_bytes(zmm[first]),
                                                                   second).tolist()
        zmm[dest] = register
        state.zmm = zmm
        state.rip = end
        session.cpu.state = state
        self.done[name] = self.done.get(name, 0) + 1
        return True

    def _decode(self, state: Any, start: int, end: int) -> tuple[str, int, int, Tensor] | None:
        """(name, destination, first source, the second source's 64 bytes) of the instruction at [start, end),
        when it is one `_lacking` does; else None."""
        code = self.read(start, end - start)
        if len(code) < 6 or code[0] != 0x62:
            return None
        p0, p1, p2, opcode, modrm = code[1], code[2], code[3], code[4], code[5]
        name = LACKING.get((p1 & 0b11, opcode))
        if not (name and p0 & 0b11 == 2 and p1 & 0b10000100 == 0b100 and p2 & 0b11100111 == 0b01000000):
            return None  # 0F38, W0, 512-bit, no mask (EVEX.b: a broadcast, below)
        inverted = lambda byte, bit: 1 - (byte >> bit & 1)  # noqa: E731 (EVEX stores these bits inverted)
        dest = (modrm >> 3 & 7) + 8 * inverted(p0, 7) + 16 * inverted(p0, 4)
        first = (~p1 >> 3 & 15) + 16 * inverted(p2, 3)
        mod, rm, broadcast = modrm >> 6, modrm & 7, bool(p2 >> 4 & 1)
        if mod == 3:
            if broadcast or len(code) != 6:
                return None
            second = rm + 8 * inverted(p0, 5) + 16 * inverted(p0, 6)
            return name, dest, first, as_bytes(state.zmm[second])
        gpr = [state.rax, state.rcx, state.rdx, state.rbx, state.rsp, state.rbp, state.rsi, state.rdi, state.r8,
               state.r9, state.r10, state.r11, state.r12, state.r13, state.r14, state.r15]
        at, address = 6, 0
        if rm == 4:  # a SIB byte: base + index * scale
            sib = code[6]
            at = 7
            index = (sib >> 3 & 7) + 8 * inverted(p0, 6)
            if index != 4:
                address += gpr[index] << (sib >> 6)
            base = (sib & 7) + 8 * inverted(p0, 5)
            if not (sib & 7 == 5 and mod == 0):
                address += gpr[base]
        elif mod == 0 and rm == 5:
            address = end  # RIP-relative
        else:
            address = gpr[rm + 8 * inverted(p0, 5)]
        if mod == 1:  # disp8, scaled by the operand's size (EVEX's compressed displacement)
            address += struct.unpack_from("<b", code, at)[0] * (4 if broadcast else 64)
            at += 1
        elif mod == 2 or (mod == 0 and (rm == 5 or (rm == 4 and code[6] & 7 == 5))):
            address += struct.unpack_from("<i", code, at)[0]
            at += 4
        if at != len(code):
            return None
        address &= 2**64 - 1
        data = self.read(address, 4) * 16 if broadcast else self.read(address, 64)
        return name, dest, first, torch.frombuffer(bytearray(data), dtype=torch.uint8)

    @staticmethod
    def _missing(address: int) -> None:
        raise RuntimeError(f"the emulated program touched unmapped memory at {address:#x}")
