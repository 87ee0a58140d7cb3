"""Which matmul path runs each kind of linear layer on this CPU, chosen by measurement.

kataru's kernels were tuned on AVX2 without native bf16; on a CPU with AMX or AVX512-BF16, torch's own bf16
GEMM (oneDNN) can be several times faster for prompts, and on others the reverse. So for each kind of weight
(bf16, fp16, int8, int4) and each row count bucket (decode rows 1, 2-8, 9-64; prompt chunks) the layers'
candidate paths are timed once on the model's own largest weight shape of that kind (a few seconds), the
fastest whose results agree with a float64 reference is kept, and the plan is cached per CPU model, core
count, torch threads and torch version beside the compiled kernels. A decode step's attention and RMSNorm
get plans too (kataru's kernels or torch's ops, timed on one block of the model: `decode_probe`).

`KATARU_DISPATCH` overrides: `cached` (the default: the cached plan, measured when missing or unreadable),
`measure` (measure again now), `kernels` (kataru's fixed rule: its kernels for decode, the float32 GEMM for
prompts) and `torch` (torch's own paths everywhere).

Batch invariance: a request decodes to the same bits alone or batched when one path that gives each row the
same bits at every row count serves every decode batch: kataru's kernels are made so (each build: "kernel",
AVX2, and "kernel-avx512"; for int8 and int4 weights the two builds even give the same bits); torch's paths
promise nothing of the kind. A plan keeps one kernel build for every decode bucket when that costs at most
`INVARIANCE_COST` in each; `batch_invariant(True)` (`Engine(batch_invariant=True)`, `--batch-invariant`)
keeps them whatever it costs (without the kernels: one torch path for all decode row counts, the best one can
do). Prompts are unaffected: a prompt's chunks do not depend on its neighbours.

A layer that takes part offers `paths` (names), `can_run(path, x)`, `run(path, x)`, `default_path(x, rows)`
(the fixed rule), `torch_path(x, rows)` and `plan_kind` (e.g. "bf16"), `plan_shape`.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import platform
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import Tensor

from kataru import kernels
from kataru.files import write_atomic

BUCKETS = ("1", "2-8", "9-64", "prompt")
DECODE = BUCKETS[:3]
ROWS = {"1": 1, "2-8": 8, "9-64": 32, "prompt": 128}  # the rows each bucket is timed with (prompt: a chunk)
MODES = ("cached", "measure", "kernels", "torch")
INVARIANT = frozenset({*kernels.PATHS, *kernels.PACKED_PATHS})  # each kernel: a row's bits in any batch; torch nothing
# paths that read the weight stored another way (one layout, its builds): taken everywhere or nowhere
LAYOUT = frozenset(kernels.PACKED_PATHS)
INVARIANCE_COST = 0.10  # one decode path for every bucket when it is at most this much slower in each
TOLERANCE = 0.02  # relative error (Frobenius) against float64 that a path may have; the kernels' bounds are tighter
VERSION = 5  # 2: the AVX-512 kernel build is a candidate; 3: the packed bf16 layout; 4: its kernel prefetches;
# 5: the packed layout's AVX-512 build (vdpbf16ps)
HEAD_ROWS = 32000  # wider layers are vocabulary heads: timed only when the model has nothing else of the kind


class Planned(Protocol):
    paths: tuple[str, ...]
    plan_kind: str

    @property
    def plan_shape(self) -> tuple[int, int]: ...
    def can_run(self, path: str, x: Tensor) -> bool: ...
    def run(self, path: str, x: Tensor) -> Tensor: ...
    def default_path(self, x: Tensor, rows: int) -> str: ...
    def torch_path(self, x: Tensor, rows: int) -> str: ...
    def reference_weight(self) -> Tensor: ...


@dataclass
class Plan:
    """The measured times (ms) of every candidate per bucket, and the paths chosen from them."""

    key: str
    ms: dict[str, dict[str, float]]
    mixed: dict[str, str] = field(default_factory=dict)  # the fastest per bucket
    uniform: dict[str, str] = field(default_factory=dict)  # one decode path for all decode buckets

    def __post_init__(self) -> None:
        if self.mixed and self.uniform:  # read back from a cache file
            return
        ms = self._layout_ms()
        if not self.mixed:
            self.mixed = {b: min(times, key=times.get) for b, times in ms.items() if times}
        if not self.uniform:
            self.uniform = dict(self.mixed)
            common = set.intersection(*(set(ms.get(b, {})) for b in DECODE))
            # the kernel build made to give every row the same bits in any batch, else any path (torch promises
            # no invariance across row counts); of those, the least summed slowdown
            candidates = (common & INVARIANT) or common
            if candidates:
                best = {b: min(self.ms[b].values()) for b in DECODE}
                one = min(sorted(candidates), key=lambda p: sum(self.ms[b][p] / best[b] for b in DECODE))
                self.uniform.update(dict.fromkeys(DECODE, one))

    def _layout_ms(self) -> dict[str, dict[str, float]]:
        """The times of the paths of one weight layout: the packed paths (the layout's best per bucket) for
        every bucket when their summed slowdown over the buckets is less than the other paths' best, else none
        of them (one copy of a weight)."""
        ms = {b: times for b, times in self.ms.items() if times}
        if not any(LAYOUT & set(times) for times in ms.values()):
            return ms
        best = {b: min(times.values()) for b, times in ms.items()}
        ours = {b: min((t for p, t in times.items() if p in LAYOUT), default=float("inf")) for b, times in ms.items()}
        others = {b: min((t for p, t in times.items() if p not in LAYOUT), default=float("inf"))
                  for b, times in ms.items()}
        packed = sum(ours[b] / best[b] for b in ms) < sum(others[b] / best[b] for b in ms)
        return {b: {p: t for p, t in times.items() if (p in LAYOUT) == packed} for b, times in ms.items()}

    def paths_used(self) -> set[str]:
        return set(self.mixed.values()) | set(self.uniform.values())

    @property
    def invariant_cost(self) -> float:
        """How much slower (at worst, over the decode buckets) one decode path is than the fastest of each."""
        return max((self.ms[b][self.uniform[b]] / self.ms[b][self.mixed[b]] - 1 for b in DECODE
                    if b in self.ms and b in self.uniform and b in self.mixed), default=0.0)

    def path(self, bucket: str, invariant: bool) -> str | None:
        if invariant or self.unify:
            return self.uniform.get(bucket)
        return self.mixed.get(bucket)

    @functools.cached_property
    def unify(self) -> bool:
        """Whether the kernels keep every decode bucket by default (they cost little enough)."""
        return self.invariant_cost <= INVARIANCE_COST

    def fits(self, paths: tuple[str, ...]) -> bool:
        """Every bucket measured, and only paths the layer has (else the plan is from another kataru)."""
        named = {p for times in self.ms.values() for p in times} | set(self.mixed.values()) | set(self.uniform.values())
        return set(DECODE) <= set(self.ms) <= set(BUCKETS) and named <= set(paths)

    def to_json(self) -> dict[str, Any]:
        return {"ms": self.ms, "mixed": self.mixed, "uniform": self.uniform}


_state: dict[str, Any] = {"mode": None, "invariant": False, "plans": {}, "kinds": {}}


def mode() -> str:
    if _state["mode"] is None:
        value = os.environ.get("KATARU_DISPATCH", "cached").strip().lower() or "cached"
        if value not in MODES:
            print(f"kataru: KATARU_DISPATCH={value!r} is not one of {', '.join(MODES)}; using cached",
                  file=sys.stderr)
            value = "cached"
        _state["mode"] = value
    return _state["mode"]


def reset() -> None:
    """Forget the plans in memory and read KATARU_DISPATCH again (tests, benchmarks)."""
    _state.update(mode=None, invariant=False, plans={}, kinds={})


def batch_invariant(on: bool = True) -> None:
    """One path for every decode row count from now on in this process (a request's bits do not depend on
    its batch); off again only through `reset`."""
    _state["invariant"] = _state["invariant"] or on


@contextlib.contextmanager
def forced(how: str) -> Iterator[None]:
    """KATARU_DISPATCH=how inside the block (a benchmark's "torch's paths" contestant)."""
    assert how in MODES, how
    saved = mode()
    _state["mode"] = how
    try:
        yield
    finally:
        _state["mode"] = saved


def bucket(rows: int) -> str:
    return "1" if rows <= 1 else "2-8" if rows <= 8 else "9-64" if rows <= 64 else "prompt"


_pin = threading.local()


@contextlib.contextmanager
def pinned(rows: int) -> Iterator[None]:
    """Inside the block (on this thread), decode calls of up to 64 rows take the paths the plan gives a decode
    batch of `rows` rows, whatever their own row count: speculation verifies the proposals of a batch of B
    sequences in B + k rows computed as a plain step of those B computes each row (`engine.speculate`). For one
    sequence, torch's attention also runs each row over its own slots, as its decode step would (`pinned_alone`)."""
    saved = getattr(_pin, "bucket", None)
    _pin.bucket = bucket(rows)
    try:
        yield
    finally:
        _pin.bucket = saved


def pinned_alone() -> bool:
    """Whether the calls on this thread compute rows as a plain step of one sequence would (`pinned(1)`)."""
    return getattr(_pin, "bucket", None) == "1"


def _bucket(rows: int) -> str:
    held = getattr(_pin, "bucket", None)
    return held if held is not None and rows <= ROWS["9-64"] * 2 else bucket(rows)


def choose(layer: Planned, x: Tensor) -> str:
    """The path for this call: the plan's where one was made for this kind of layer and the path can run now,
    else the fixed rule."""
    rows = x.numel() // x.shape[-1]
    how = mode()
    if how == "torch":
        return layer.torch_path(x, rows)
    plan = _state["plans"].get(plan_key(layer)) or _state["kinds"].get(layer.plan_kind)
    if how != "kernels" and plan is not None:
        path = plan.path(_bucket(rows), _state["invariant"])
        if path is not None and layer.can_run(path, x):
            return path
    return layer.default_path(x, rows)


def row_invariant(model: torch.nn.Module) -> bool:
    """Whether every planned layer of the model runs one path, for decode batches and prompt chunks alike, that
    gives a row the same bits at any row count (a kernel build or the packed layout): then decode rows computed
    beside a prompt chunk (`Transformer.mixed`) get the bits of a decode step of their own. Not under the fixed
    rules, nor where a layer has no plan (float32 weights: torch's GEMM) or cannot run the plan's path."""
    if mode() in ("torch", "kernels"):
        return False
    dtype = _activation_dtype(model)
    with torch.inference_mode():
        for module in model.modules():
            if not hasattr(module, "plan_kind"):
                continue
            plan = _state["plans"].get(plan_key(module)) or _state["kinds"].get(module.plan_kind)
            if plan is None or not _on_cpu(module):
                return False
            paths = {plan.path(b, _state["invariant"]) for b in BUCKETS}
            path = paths.pop() if len(paths) == 1 else None
            if path not in INVARIANT or not module.can_run(path, torch.zeros(1, module.plan_shape[1], dtype=dtype)):
                return False
    return True


SHORT = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "f32"}
STEP_KINDS = ("attention", "norm")  # kataru's decode kernels or torch's ops, for a whole decode step's rows


def step_path(kind: str, dtype: torch.dtype, rows: int) -> str:
    """"kernel" or "torch" for the attention or norm of `rows` decode rows (the kernel unless a plan or the
    override says otherwise; the callers check that the kernel can run at all)."""
    how = mode()
    if how in ("torch", "kernels"):
        return "torch" if how == "torch" else "kernel"
    plan = _state["kinds"].get(f"{kind}-{SHORT.get(dtype, dtype)}")
    return (plan.path(_bucket(rows), _state["invariant"]) if plan is not None else None) or "kernel"


def plan_key(layer: Planned) -> str:
    n, k = layer.plan_shape
    return f"{layer.plan_kind}:{n}x{k}"


# --- measuring ---------------------------------------------------------------------------------------------
def cpu() -> dict[str, Any]:
    """What kataru knows of this CPU: its name, cores, torch's SIMD level and the instruction sets that matter."""
    name = kernels.cpuinfo().get("model name") or platform.processor() or platform.machine()
    flags = kernels.cpu_flags()
    wanted = ("avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx512_bf16",
              "avx512_fp16", "avx_vnni", "amx_tile", "amx_bf16", "amx_int8", "neon", "asimd", "sve", "sve2")
    return {"model": name, "cores": os.cpu_count(), "threads": torch.get_num_threads(),
            "torch_capability": torch.backends.cpu.get_cpu_capability(),
            "features": [f for f in wanted if f in flags], "kernels": kernels.available("linear"),
            "kernel_builds": kernels.isas(),
            "kernel_extensions": {isa: kernels.extensions(isa) for isa in kernels.isas()}}


def builds_text(c: dict[str, Any]) -> str:
    """`cpu()`'s kernel builds with what each uses beyond its base, e.g. "avx2, avx512 (vnni, bf16)"; "none"."""
    extra = c.get("kernel_extensions", {})
    return ", ".join(isa + (f" ({', '.join(extra[isa])})" if extra.get(isa) else "")
                     for isa in c["kernel_builds"]) or "none"


def plan_file() -> Path:
    c = cpu()
    slug = "".join(ch if ch.isalnum() else "-" for ch in c["model"]).strip("-").lower()[:60] or "cpu"
    builds = "+".join(c["kernel_builds"]) or "no-kernels"
    return (kernels.cache_dir().parent / "plans" /
            f"{slug}-{c['cores']}c-{c['threads']}t-{builds}-torch{torch.__version__}.json")


def read_plans(path: Path) -> dict[str, Plan]:
    """The plans in a cache file; {} when it is missing, corrupt or of another version (measured again)."""
    try:
        data = json.loads(path.read_text())
        if data.get("version") != VERSION:
            return {}
        plans = {}
        for key, entry in data["plans"].items():
            ms = {b: {p: float(t) for p, t in times.items()} for b, times in entry["ms"].items() if b in BUCKETS}
            plan = Plan(key, ms, dict(entry["mixed"]), dict(entry["uniform"]))
            if set(plan.mixed) - set(BUCKETS) or any(p not in ms.get(b, {}) for b, p in plan.mixed.items()) or \
                    any(p not in ms.get(b, {}) for b, p in plan.uniform.items()):
                return {}
            plans[key] = plan
        return plans
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return {}


def write_plans(path: Path, plans: dict[str, Plan]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    data = {"version": VERSION, "cpu": cpu(), "torch": torch.__version__,
            "plans": {key: plan.to_json() for key, plan in sorted(plans.items())}}
    write_atomic(path, json.dumps(data, indent=1) + "\n")


def time_path(layer: Planned, path: str, x: Tensor, budget: float = 0.08, best: float = float("inf")) -> float:
    """Milliseconds of one call: the least of a few within `budget` seconds, or the first call alone when it is
    already far slower than `best` (a path that has lost is not timed on)."""
    start = time.perf_counter()
    layer.run(path, x)  # also warms: packing, caches, first-call allocations
    first = time.perf_counter() - start
    if 1000 * first > 4 * best:
        return 1000 * first
    times: list[float] = []
    spent = 0.0
    while not times or (spent < budget and len(times) < 20):
        start = time.perf_counter()
        layer.run(path, x)
        times.append(time.perf_counter() - start)
        spent += times[-1]
    return 1000 * min(times)


def error_bound(x: Tensor, weight: Tensor, exact: Tensor) -> Tensor:
    """The bound of kataru's quantized kernels' tests against float64, per output: each input off by half its
    int8 block step h (kernels that quantize activations), every term of sum (|x| + h)|w| off by a 16-bit
    rounding (weights, scales and minimums stored in bf16), the result rounded once (2^-7 covers bf16's 2^-8
    with room)."""
    rows, k = x.shape
    blocks = torch.nn.functional.pad(x.float().abs(), (0, (-k) % 64)).reshape(rows, -1, 64)
    h = (blocks.amax(-1, keepdim=True) / 127 / 2).expand_as(blocks).reshape(rows, -1)[:, :k]
    magnitude = weight.abs().t()
    return 2**-7 * exact.abs() + (h @ magnitude + 2**-8 * ((x.float().abs() + h) @ magnitude)).double()


def agrees(layer: Planned, path: str, x: Tensor, exact: Tensor, bound: Tensor) -> bool:
    y = layer.run(path, x).double()
    return bool(torch.isfinite(y).all()) and bool(((y - exact).abs() <= bound).all())


PROMPT_PATHS = {"upcast", "dequant", "dequant16"}  # convert the whole weight per call: only worth it for many rows


def measure(layer: Planned, dtype: torch.dtype, buckets: tuple[str, ...] = BUCKETS,
            slow: dict[str, float] | None = None) -> Plan:
    """Time every path the layer can run, per bucket, on random inputs of `dtype` (the fixed rule's path
    first); `slow` adds seconds to a path's calls (tests: a candidate made slow on purpose)."""
    n, k = layer.plan_shape
    generator = torch.Generator().manual_seed(0)
    weight = layer.reference_weight().float()
    ms: dict[str, dict[str, float]] = {}
    with torch.inference_mode():
        for b in buckets:
            x = torch.randn(ROWS[b], k, generator=generator).to(dtype)
            exact = x.double() @ weight.double().t()
            bound = error_bound(x, weight, exact)
            first = layer.default_path(x, ROWS[b])
            times: dict[str, float] = {}
            for path in sorted(layer.paths, key=lambda p: p != first):
                if b in ("1", "2-8") and path in PROMPT_PATHS:
                    continue
                if not layer.can_run(path, x) or not agrees(layer, path, x, exact, bound):
                    continue
                extra = 1000 * (slow or {}).get(path, 0.0)
                times[path] = time_path(layer, path, x, best=min(times.values(), default=float("inf"))) + extra
            ms[b] = times
    return Plan(f"{layer.plan_kind}:{n}x{k}", ms)


def measure_step(probe: Any, kind: str, buckets: tuple[str, ...] = DECODE,
                 slow: dict[str, float] | None = None) -> dict[str, dict[str, float]]:
    """Times one block's decode step (`probe(rows)` makes it) with the `kind` kernel and with torch's ops
    instead, per decode bucket; the kernel counts only where the block's output agrees with torch's ops (both
    checked with torch's matmuls)."""
    ms: dict[str, dict[str, float]] = {}
    with torch.inference_mode():
        for b in buckets:
            step = probe(ROWS[b])
            # checked with torch's matmuls around it: an int8 or 4-bit kernel quantizes its input again, which
            # would magnify the kernel's rounding differences into the block's output
            with kernels.disabled("linear"):
                with kernels.disabled(kind):
                    reference = step().double()
                differs = (step().double() - reference).abs().max() > 2**-6 * reference.abs().max() + 1e-3
            times: dict[str, float] = {}
            for path in ("torch",) if differs else ("kernel", "torch"):
                with contextlib.nullcontext() if path == "kernel" else kernels.disabled(kind):
                    start = time.perf_counter()
                    best = float("inf")
                    while time.perf_counter() - start < 0.08 or best == float("inf"):
                        t = time.perf_counter()
                        step()
                        best = min(best, time.perf_counter() - t)
                    times[path] = 1000 * best + 1000 * (slow or {}).get(path, 0.0)
            ms[b] = times
    return ms


def prepare(model: torch.nn.Module, progress: bool = False) -> dict[str, Plan]:
    """Make (or read) the plan for each kind of planned layer in the model: timed on the shape of that kind
    that holds the most weights; the kind's other shapes follow it."""
    how = mode()
    if how in ("kernels", "torch"):
        return {}
    layers: dict[str, dict[str, list[Any]]] = {}
    for module in model.modules():
        if hasattr(module, "plan_kind") and getattr(module, "plan_kind", None) and _on_cpu(module):
            layers.setdefault(module.plan_kind, {}).setdefault(plan_key(module), []).append(module)
    path = plan_file()
    cached = {} if how == "measure" else read_plans(path)
    chosen: dict[str, Plan] = {}
    dtype = _activation_dtype(model)
    for kind, shapes in layers.items():
        body = {s: layer for s, layer in shapes.items() if layer[0].plan_shape[0] < HEAD_ROWS} or shapes
        key = max(body, key=lambda s: _size(shapes[s][0]) * len(shapes[s]))
        if key not in cached or not cached[key].fits(shapes[key][0].paths):
            if progress:
                print(f"kataru: timing the {kind} matmul paths on {key.split(':')[1]} for this CPU (once; "
                      f"cached in {path})", file=sys.stderr)
            cached[key] = measure(shapes[key][0], dtype)
            write_plans(path, {**read_plans(path), **cached})  # beside the plans of other shapes and kinds
        chosen[kind] = cached[key]
        _state["plans"][key] = cached[key]
        _state["kinds"][kind] = cached[key]
        settle(model, shapes, cached[key])
    dtype_name = SHORT.get(dtype, str(dtype))
    probe = getattr(model, "decode_probe", None)
    if probe is not None and _on_cpu(model.tok_embeddings) and dtype in kernels.ACTIVATIONS:
        for kind in STEP_KINDS:
            if not kernels.available(kind) or (kind == "norm" and not _has_rmsnorm(model)):
                continue
            c = model.config
            key = f"{kind}-{dtype_name}:{c.dim}/{c.n_head}/{c.n_kv_head}"
            if key not in cached or not cached[key].fits(("kernel", "torch")):
                if progress:
                    print(f"kataru: timing the {kind} paths of a decode step for this CPU (once)", file=sys.stderr)
                cached[key] = Plan(key, measure_step(probe, kind))
                write_plans(path, {**read_plans(path), **cached})
            chosen[f"{kind}-{dtype_name}"] = _state["kinds"][f"{kind}-{dtype_name}"] = cached[key]
    return chosen


def settle(model: torch.nn.Module, shapes: dict[str, list[Any]], plan: Plan) -> None:
    """Each layer of the kind keeps the one weight layout the plan reads (`Linear.settle`); a weight that other
    modules share (a tied output head's) stays as it is."""
    shared = {t.data_ptr() for m in model.modules() if not hasattr(m, "plan_kind") for t in m.parameters(False)}
    for layers in shapes.values():
        for layer in layers:
            if hasattr(layer, "settle"):
                layer.settle(plan.paths_used(), layer.weight.data_ptr() in shared)


def _has_rmsnorm(model: torch.nn.Module) -> bool:
    return any(type(m).__name__ == "RMSNorm" for m in model.modules())


def plans_for(model: torch.nn.Module) -> dict[str, Plan]:
    """The plans in use for the model's kinds of layer (by kind)."""
    kinds = {getattr(m, "plan_kind", None) for m in model.modules()}
    kinds |= {f"{kind}-{SHORT.get(_activation_dtype(model))}" for kind in STEP_KINDS}
    return {kind: plan for kind, plan in _state["kinds"].items() if kind in kinds}


def _on_cpu(module: torch.nn.Module) -> bool:
    tensor = next(iter(module.buffers()), None) if not list(module.parameters(recurse=False)) else \
        next(module.parameters(recurse=False))
    return tensor is not None and tensor.device.type == "cpu"


def _size(layer: Planned) -> int:
    n, k = layer.plan_shape
    return n * k


def _activation_dtype(model: torch.nn.Module) -> torch.dtype:
    embeddings = getattr(model, "tok_embeddings", None)
    return embeddings.weight.dtype if embeddings is not None else torch.bfloat16


def table(plans: dict[str, Plan]) -> list[dict[str, Any]]:
    """One row per kind and bucket: every candidate's time and what the plan runs (for `kataru bench plan`)."""
    rows = []
    for kind, plan in plans.items():
        for b in BUCKETS:
            if b in plan.ms:
                rows.append({"kind": kind, "shape": plan.key.split(":")[1], "bucket": b, "rows": ROWS[b],
                             "ms": plan.ms[b], "fastest": plan.mixed.get(b),
                             "runs": plan.path(b, _state["invariant"]),
                             "batch_invariant": plan.uniform.get(b)})
    return rows
