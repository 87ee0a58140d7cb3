"""`kataru bench`: prefill and decode speed, against the memory-bandwidth roofline and transformers.

A named seed shape builds random weights (transformers builds them when comparing, so both run the very
same tensors); a folder loads a checkpoint. Decode is timed over a fixed number of new tokens with eos
ignored, prefill over a 512-token prompt; the roofline is the measured read bandwidth divided by the
bytes of weights a decode step reads.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from kataru import dispatch, kernels
from kataru.charts import pyplot
from kataru.config import ModelConfig
from kataru.engine import Engine
from kataru.errors import KataruError
from kataru.model import Transformer, dense_weights, weight_bytes
from kataru.quantize import quantize as quantize_model
from kataru.runtime import dtype_name, resolve_device, resolve_dtype
from kataru.sampling import SamplingParams
from kataru.shapes import build_shape, shape_config


@dataclass
class Result:
    engine: str
    prefill_tok_s: float
    ttft_s: float
    decode_b1_tok_s: float
    decode_b8_tok_s: float
    roofline_fraction: float | None = None


def memory_bandwidth_gbs(megabytes: int = 512, repeats: int = 5, device: str = "cpu") -> float:
    """Read bandwidth: best time to sum a buffer much larger than the caches (of the CPU or the GPU)."""
    x = torch.ones(megabytes * (1 << 20) // 4, dtype=torch.float32, device=device)
    x.sum()
    best = float("inf")
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        x.sum()
        synchronize(device)
        best = min(best, time.perf_counter() - start)
    return x.numel() * 4 / best / 1e9


def alternate(run: Callable[[], object], modes: dict[str, Callable[[], object]], blocks: int) -> dict[str, float]:
    """Median seconds of `run` in each mode (each value switches its mode on), in alternating blocks so that
    every mode meets the same machine load (this shared machine swings 20-40% between minutes). The last
    mode stays switched on."""
    times: dict[str, list[float]] = {name: [] for name in modes}
    for _ in range(blocks):
        for name, switch in modes.items():
            switch()
            start = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def median_result(runs: list[Result]) -> Result:
    """Each figure's median over the rounds of one engine."""
    def mid(key: str) -> float:
        return statistics.median(getattr(r, key) for r in runs)

    return Result(runs[0].engine, mid("prefill_tok_s"), mid("ttft_s"), mid("decode_b1_tok_s"), mid("decode_b8_tok_s"))


def synchronize(device: str | torch.device) -> None:
    """Wait for the GPU's queued work, so that the clock measures it (a no-op on the CPU)."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def peak_rss_bytes() -> int:
    try:
        status = Path("/proc/self/status").read_text()
        return int(status.split("VmHWM:")[1].split()[0]) * 1024
    except (OSError, IndexError):
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def time_kataru(model: Transformer, prompt_len: int, new_tokens: int, batch: int, compile: bool = False,
                rows: int | None = None, row_len: int | None = None) -> tuple[float, float]:
    """(prefill seconds, decode seconds for new_tokens - 1 per row) on the continuous-batching engine: the first
    step prefills every prompt whole (no chunks) and samples each row's first token, the rest are decode
    steps. rows and row_len fix the cache's shape (a compiled step is specialised on it)."""
    vocab = model.config.vocab_size
    engine = Engine(model, set(), max_batch=rows or batch, row_len=row_len or prompt_len + new_tokens,
                    compile=compile, prefill_chunk=None)
    params = SamplingParams(max_new_tokens=new_tokens, do_sample=False, ignore_eos=True)
    for _ in range(batch):
        engine.submit(torch.randint(3, vocab, (prompt_len,)).tolist(), params)
    device = model.tok_embeddings.weight.device
    synchronize(device)
    start = time.perf_counter()
    engine.step()  # every request is prefilled and gets its first token
    synchronize(device)
    first = time.perf_counter()
    engine.run()
    synchronize(device)
    return first - start, time.perf_counter() - first


@torch.inference_mode()
def time_transformers(model: torch.nn.Module, prompt_len: int, new_tokens: int, batch: int) -> tuple[float, float]:
    """(prefill seconds, decode seconds for new_tokens - 1 per row) of transformers' generate, timed from inside:
    a stopping criterion notes the clock after every token (subtracting a separate prefill run would bury
    the decode steps in the prefill's noise at long prompts)."""
    import transformers

    class Clock(transformers.StoppingCriteria):
        def __init__(self) -> None:
            self.times: list[float] = []

        def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs: Any) -> torch.Tensor:
            synchronize(input_ids.device)
            self.times.append(time.perf_counter())
            return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)

    vocab = model.config.vocab_size
    ids = torch.randint(3, vocab, (batch, prompt_len)).to(model.device)
    clock = Clock()
    synchronize(model.device)
    start = time.perf_counter()
    model.generate(ids, do_sample=False, max_new_tokens=new_tokens, min_new_tokens=new_tokens, pad_token_id=0,
                   eos_token_id=None, stopping_criteria=transformers.StoppingCriteriaList([clock]))
    return clock.times[0] - start, max(clock.times[-1] - clock.times[0], 1e-9)


@dataclass
class Setup:
    """What one bench run measures: the model, the same weights in transformers (or None), and its sizes."""

    target: str
    model: Transformer
    reference: torch.nn.Module | None
    device: str
    prompt_len: int
    new_tokens: int
    context: int

    def result(self, name: str, prefill: float, decode1: float, decode8: float) -> Result:
        steps = self.new_tokens - 1
        return Result(name, self.prompt_len / prefill, prefill, steps / decode1, 8 * steps / decode8)


def build(target: str, dtype: str, layers: int | None, compare: bool, device: str, prompt_len: int,
          new_tokens: int, context: int) -> Setup:
    """A seed shape with random weights (built on the CPU, then moved) or a checkpoint folder, with the
    transformers model of the same weights when comparing."""
    reference = None
    if Path(target).is_dir():
        from kataru.llm import load

        model = load(target, dtype=dtype, device=device, progress=False).model
        if compare:
            import transformers

            reference = transformers.AutoModelForCausalLM.from_pretrained(
                target, dtype=model.tok_embeddings.weight.dtype).eval()
    else:
        torch_dtype = resolve_dtype(dtype, ModelConfig.from_hf(shape_config(target, layers)))
        model, reference = build_shape(target, layers, torch_dtype, compare)
        model = model.to(device)
    if reference is not None:
        reference = reference.to(device)
    limit = model.config.max_seq_len - new_tokens - 1
    return Setup(target, model, reference, device, min(prompt_len, limit), new_tokens, min(context, limit))


def measure_kataru(setup: Setup, name: str, model: Transformer, compile: bool = False) -> Result:
    p, n, c = setup.prompt_len, setup.new_tokens, setup.context
    shape: dict[str, int] = {}
    if compile:
        # one cache shape for every run below (a compiled step is specialised on it), and both compilations
        # (batch 1 is a special case for the compiler) done before timing
        shape = {"rows": 8, "row_len": max(p, c) + n}
        time_kataru(model, c, 4, 8, True, **shape)
    time_kataru(model, 16, 4, 1, compile, **shape)  # warm up allocators and kernels
    prefill, _ = time_kataru(model, p, 1, 1, compile, **shape)
    _, decode1 = time_kataru(model, c, n, 1, compile, **shape)
    _, decode8 = time_kataru(model, c, n, 8, compile, **shape)
    return setup.result(name, prefill, decode1, decode8)


def measure_transformers(setup: Setup) -> Result:
    assert setup.reference is not None
    p, n, c = setup.prompt_len, setup.new_tokens, setup.context
    time_transformers(setup.reference, 16, 2, 1)
    prefill, _ = time_transformers(setup.reference, p, 1, 1)
    _, decode1 = time_transformers(setup.reference, c, n, 1)
    _, decode8 = time_transformers(setup.reference, c, n, 8)
    return setup.result("transformers", prefill, decode1, decode8)


def contestants(setup: Setup, quantize: list[str], compile: bool) -> dict[str, Callable[[], Result]]:
    """Each engine to measure, by name: kataru, the same engine on torch's matmuls where kataru's 16-bit kernel
    runs (what the kernels add), compiled, quantized copies, transformers."""
    model = setup.model

    def torch_mm() -> Result:
        # torch's matmuls (its 16-bit GEMM too, on [out, in] weights) and SDPA
        with kernels.disabled(), dispatch.forced("torch"), dense_weights(model):
            return measure_kataru(setup, "kataru torch mm", model)

    def quantized(method: str, compiled: bool) -> Result:
        # quantized anew each round rather than kept: a 7B model's quantized copies do not fit beside it
        copy = quantize_model(model, method, inplace=False)
        if setup.device == "cpu":
            dispatch.prepare(copy)
        return measure_kataru(setup, f"kataru {method}" + (" compiled" if compiled else ""), copy, compiled)

    runs: dict[str, Callable[[], Result]] = {"kataru": lambda: measure_kataru(setup, "kataru", model)}
    if half_kernel(model) or (model.tok_embeddings.weight.dtype in kernels.HALF and setup.device == "cpu"):
        runs["kataru torch mm"] = torch_mm
    if compile:
        runs["kataru compiled"] = lambda: measure_kataru(setup, "kataru compiled", model, True)
    for method in quantize:
        runs[f"kataru {method}"] = partial(quantized, method, False)
        if compile:
            runs[f"kataru {method} compiled"] = partial(quantized, method, True)
    if setup.reference is not None:
        runs["transformers"] = lambda: measure_transformers(setup)
    return runs


def half_kernel(model: Transformer) -> bool:
    weight = model.tok_embeddings.weight
    return weight.dtype in kernels.HALF and weight.device.type == "cpu" and kernels.available()


def run_rounds(runs: dict[str, Callable[[], Result]], rounds: int, progress: bool) -> list[Result]:
    """Every engine once per round, in the same order; each figure is the median of its rounds (this shared
    machine's load swings between minutes, and rounds let every engine meet the same swings)."""
    results: dict[str, list[Result]] = {name: [] for name in runs}
    with tqdm(total=rounds * len(runs), desc="bench", unit="run", disable=not progress) as bar:
        for _ in range(rounds):
            for name, run in runs.items():
                bar.set_postfix_str(name)
                results[name].append(run())
                bar.update()
    return [median_result(r) for r in results.values()]


def run_bench(target: str, dtype: str = "bfloat16", layers: int | None = None, compare: str | None = None,
              prompt_len: int = 512, new_tokens: int = 32, threads: int | None = None,
              quantize: list[str] | None = None, compile: bool = False, context: int = 16,
              device: str = "cpu", rounds: int = 1, progress: bool = True) -> dict[str, Any]:
    """context: the prompt tokens each row holds before the timed decode steps (attention reads them all).
    device: where both engines run. rounds: every engine is measured this many times, taking turns."""
    if rounds < 1:
        raise KataruError(f"rounds={rounds}: measure each engine at least once")
    if new_tokens < 2:
        raise KataruError(f"new_tokens={new_tokens}: decode speed needs at least 2 new tokens (the first comes "
                          "with the prefill)")
    if threads:
        torch.set_num_threads(threads)
    device = resolve_device(device)
    bandwidth = memory_bandwidth_gbs(device=device)  # first: its buffer is gone before the model counts to peaks
    setup = build(target, dtype, layers, compare == "transformers", device, prompt_len, new_tokens, context)
    model, config = setup.model, setup.model.config
    held = weight_bytes(model)  # a loaded checkpoint may hold some weights only as panels already
    plans = dispatch.prepare(model, progress) if torch.device(device).type == "cpu" else {}
    # a decode step reads every weight except the embedding table (only one row of it)
    step_bytes = held - model.tok_embeddings.weight.numel() * model.tok_embeddings.weight.element_size()
    if config.tie_embeddings:
        step_bytes = held
    roofline = bandwidth * 1e9 / step_bytes
    results = run_rounds(contestants(setup, quantize or [], compile), rounds, progress)
    for r in results:  # the roofline is that of the unquantized weights
        quantized = any(r.engine.startswith(f"kataru {method}") for method in quantize or [])
        r.roofline_fraction = None if quantized else r.decode_b1_tok_s / roofline
    report: dict[str, Any] = {
        "target": target, "family": config.family, "dtype": dtype_name(model.tok_embeddings.weight.dtype),
        "layers": config.n_layer, "parameters": config.num_parameters(), "weight_gb": held / 1e9,
        "prompt_tokens": setup.prompt_len, "new_tokens": new_tokens, "decode_context": setup.context,
        "threads": torch.get_num_threads(),
        "bandwidth_gbs": bandwidth, "roofline_decode_tok_s": roofline, "peak_rss_gb": peak_rss_bytes() / 1e9,
        "torch": torch.__version__, "half_kernel": half_kernel(model), "device": device, "rounds": rounds,
        "results": [asdict(r) for r in results], "cpu": dispatch.cpu(), "dispatch": dispatch.mode(),
        "plan": dispatch.table(plans),
    }
    if torch.device(device).type == "cuda":
        report["peak_gpu_gb"] = torch.cuda.max_memory_allocated(device) / 1e9
        report["gpu"] = torch.cuda.get_device_name(device)
    if setup.reference is not None:
        k, t = results[0], results[-1]
        report["ratios"] = {"prefill": k.prefill_tok_s / t.prefill_tok_s, "decode_b1": k.decode_b1_tok_s /
                            t.decode_b1_tok_s, "decode_b8": k.decode_b8_tok_s / t.decode_b8_tok_s}
    return report


def plan_report(target: str, dtype: str = "bfloat16", layers: int | None = None, quantize: list[str] | None = None,
                threads: int | None = None, progress: bool = True) -> dict[str, Any]:
    """The dispatch plan for the model's layers (and its quantized copies): every candidate's time per bucket
    and the path that runs (`kataru bench plan`)."""
    if threads:
        torch.set_num_threads(threads)
    model = build(target, dtype, layers, False, "cpu", 16, 2, 16).model
    plans = dict(dispatch.prepare(model, progress))
    for method in quantize or []:
        plans.update(dispatch.prepare(quantize_model(model, method, inplace=False), progress))
    return {"target": target, "cpu": dispatch.cpu(), "torch": torch.__version__, "dispatch": dispatch.mode(),
            "plan_file": str(dispatch.plan_file()), "plan": dispatch.table(plans)}


def format_plan(report: dict[str, Any]) -> str:
    cpu = report["cpu"]
    lines = [f"{cpu['model']}, {cpu['cores']} cores, {cpu['threads']} threads, torch {report['torch']} "
             f"({cpu['torch_capability']}; {' '.join(cpu['features']) or 'no SIMD features found'})",
             f"kataru's kernel builds here: {dispatch.builds_text(cpu)}; "
             f"KATARU_DISPATCH={report['dispatch']}; plans cached in {report['plan_file']}", ""]
    if not report["plan"]:
        lines.append("no plan: float32 weights, or KATARU_DISPATCH is kernels or torch (the fixed rules)")
        return "\n".join(lines)
    times = ["  ".join(f"{path} {ms:.3f}" for path, ms in sorted(row["ms"].items(), key=lambda kv: kv[1]))
             for row in report["plan"]]
    width = max(66, *(len(t) + 2 for t in times))  # every candidate listed, the columns after them aligned
    header = f"{'kind':<16}{'shape':<15}{'rows':>5}  {'candidates, ms per call':<{width}}{'runs':<15}{'invariant':<15}"
    lines += [header, "-" * len(header)]
    for row, listed in zip(report["plan"], times, strict=True):
        lines.append(f"{row['kind']:<16}{row['shape']:<15}{row['rows']:>5}  {listed:<{width}}{row['runs'] or '-':<15}"
                     f"{row['batch_invariant'] or '-':<15}")
    return "\n".join(lines)


def format_table(report: dict[str, Any]) -> str:
    where = report.get("gpu") or f"{report['threads']} threads"
    peak = f"peak RSS {report['peak_rss_gb']:.2f} GB"
    if "peak_gpu_gb" in report:
        peak += f", peak GPU memory {report['peak_gpu_gb']:.2f} GB"
    lines = [f"{report['target']} ({report['family']}, {report['layers']} layers, {report['dtype']}, "
             f"{report['weight_gb']:.2f} GB, {where}, torch {report['torch']})",
             f"memory bandwidth {report['bandwidth_gbs']:.1f} GB/s -> decode roofline "
             f"{report['roofline_decode_tok_s']:.1f} tok/s; {peak}",
             f"prefill {report['prompt_tokens']} tokens; decode {report['new_tokens']} tokens per row after "
             f"{report.get('decode_context', 16)}" + (f"; medians of {report['rounds']} rounds"
                                                        if report.get("rounds", 1) > 1 else ""), ""]
    header = f"{'engine':<20}{'prefill tok/s':>14}{'TTFT s':>9}{'decode b1':>11}{'decode b8':>11}{'roofline':>10}"
    lines += [header, "-" * len(header)]
    for r in report["results"]:
        roof = f"{100 * r['roofline_fraction']:.0f}%" if r["roofline_fraction"] is not None else "n/a"
        lines.append(f"{r['engine']:<20}{r['prefill_tok_s']:>14.1f}{r['ttft_s']:>9.3f}{r['decode_b1_tok_s']:>11.2f}"
                     f"{r['decode_b8_tok_s']:>11.2f}{roof:>10}")
    if "ratios" in report:
        ratios = report["ratios"]
        lines.append(f"{'kataru/transformers':<20}{ratios['prefill']:>13.2f}x{'':>9}{ratios['decode_b1']:>10.2f}x"
                     f"{ratios['decode_b8']:>10.2f}x")
    return "\n".join(lines)


def plot(report: dict[str, Any], path: str) -> None:
    plt = pyplot()
    metrics = [("prefill_tok_s", "prefill tok/s"), ("decode_b1_tok_s", "decode b1 tok/s"),
               ("decode_b8_tok_s", "decode b8 tok/s")]
    fig, axes = plt.subplots(1, 3, figsize=(11, 3.5))
    for ax, (key, title) in zip(axes, metrics, strict=True):
        names = [r["engine"] for r in report["results"]]
        colors = ["#7f8c8d" if n == "transformers" else "#c0392b" for n in names]
        ax.bar(names, [r[key] for r in report["results"]], color=colors)
        plt.setp(ax.get_xticklabels(), rotation=30, ha="right")
        if key == "decode_b1_tok_s":
            ax.axhline(report["roofline_decode_tok_s"], linestyle="--", color="k", label=f"{report['dtype']} roofline")
            ax.legend()
        ax.set_title(title)
    fig.suptitle(f"{report['target']} {report['dtype']}, {report.get('gpu') or str(report['threads']) + ' threads'}")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
