"""`kataru bench`: prefill and decode speed, against the memory-bandwidth roofline and transformers.

A named seed shape builds random weights (transformers builds them when comparing, so both run the very
same tensors); a folder loads a checkpoint. Decode is timed over a fixed number of new tokens with eos
ignored, prefill over a 512-token prompt; the roofline is the measured read bandwidth divided by the
bytes of weights a decode step reads.
"""

from __future__ import annotations

import json
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from kataru import kernels
from kataru.checkpoint import load_weights, resolve_device, resolve_dtype
from kataru.config import ModelConfig
from kataru.engine import Engine, compiled_decode
from kataru.errors import KataruError
from kataru.generation import SamplingParams
from kataru.model import Transformer
from kataru.quantize import quantize as quantize_model

# config.json values of the real checkpoints (architectures.md; intermediate sizes as published).
SHAPES: dict[str, dict[str, Any]] = {
    "llm-jp-3.1-1.8b": {"model_type": "llama", "vocab_size": 99584, "hidden_size": 2048, "num_hidden_layers": 24,
                        "num_attention_heads": 16, "num_key_value_heads": 16, "intermediate_size": 7168,
                        "max_position_embeddings": 4096, "rms_norm_eps": 1e-5, "rope_theta": 10000.0},
    "rinna-3.6b": {"model_type": "gpt_neox", "vocab_size": 32000, "hidden_size": 2816, "num_hidden_layers": 36,
                   "num_attention_heads": 22, "intermediate_size": 11264, "max_position_embeddings": 2048,
                   "rotary_pct": 1.0, "use_parallel_residual": False, "hidden_act": "gelu"},
    "jslm-3b-4e1t": {"model_type": "stablelm", "vocab_size": 50304, "hidden_size": 2560, "num_hidden_layers": 32,
                     "num_attention_heads": 32, "num_key_value_heads": 32, "intermediate_size": 6912,
                     "max_position_embeddings": 4096, "partial_rotary_factor": 0.25, "layer_norm_eps": 1e-5},
    "gamma-7b": {"model_type": "mistral", "vocab_size": 32000, "hidden_size": 4096, "num_hidden_layers": 32,
                 "num_attention_heads": 32, "num_key_value_heads": 8, "intermediate_size": 14336,
                 "max_position_embeddings": 32768, "sliding_window": 4096, "rms_norm_eps": 1e-5},
    "alpha-7b": {"model_type": "japanese_stablelm_alpha", "vocab_size": 65536, "hidden_size": 4096,
                 "num_hidden_layers": 32, "num_attention_heads": 32, "max_position_embeddings": 2048,
                 "rotary_pct": 0.25, "rotary_scale_base": 512},
    # A few-MB model for CI and smoke tests.
    "tiny": {"model_type": "llama", "vocab_size": 1024, "hidden_size": 128, "num_hidden_layers": 2,
             "num_attention_heads": 4, "num_key_value_heads": 2, "intermediate_size": 320,
             "max_position_embeddings": 1024, "rms_norm_eps": 1e-5},
}
HF_CLASSES = {"llama": "LlamaForCausalLM", "gpt_neox": "GPTNeoXForCausalLM", "stablelm": "StableLmForCausalLM",
              "mistral": "MistralForCausalLM"}


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


def shape_config(name: str, layers: int | None = None) -> dict[str, Any]:
    """The config.json of a seed shape, optionally with fewer layers."""
    if name not in SHAPES:
        raise KataruError(f"unknown shape {name!r}; choose one of {', '.join(SHAPES)} or give a model folder")
    hf_config = dict(SHAPES[name])
    if layers:
        hf_config["num_hidden_layers"] = layers
    return hf_config


def build_shape(name: str, layers: int | None, dtype: torch.dtype, with_reference: bool):  # type: ignore[no-untyped-def]
    """(kataru model, transformers model or None) sharing the same random weights."""
    hf_config = shape_config(name, layers)
    config = ModelConfig.from_hf(hf_config)
    torch.manual_seed(0)
    reference = None
    if with_reference and config.family in HF_CLASSES:
        import transformers

        cls = getattr(transformers, HF_CLASSES[config.family])
        config_cls = cls.config_class
        hf = config_cls(**{k: v for k, v in hf_config.items() if k != "model_type"})
        with torch.device("meta"):
            reference = cls(hf)
        reference = reference.to_empty(device="cpu").to(dtype)
        with torch.no_grad():
            for p in reference.parameters():
                p.normal_(0, 0.02)
        # to_empty leaves buffers uninitialised: rebuild the rotary tables (the only buffers) properly.
        for name, module in list(reference.named_modules()):
            if type(module).__name__.endswith("RotaryEmbedding"):
                parent, _, child = name.rpartition(".")
                setattr(reference.get_submodule(parent) if parent else reference, child, type(module)(config=hf))
        assert not [n for n, _ in reference.named_buffers() if "rotary" not in n], "unexpected buffers"
        return load_weights(Path(name), config, dtype, progress=False, state_dict=reference.state_dict()), reference
    return random_model(config, dtype), None


def random_model(config: ModelConfig, dtype: torch.dtype) -> Transformer:
    """kataru's model with random weights, allocated once in the target dtype."""
    from kataru.model import Rotary

    with torch.device("meta"):
        model = Transformer(config)
    model = model.to_empty(device="cpu").to(dtype)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.fill_(1.0) if "norm" in name and name.endswith("weight") else p.normal_(0, 0.02)
    model.rotary = Rotary(config)
    return model.eval().requires_grad_(False)


def shape_arguments(parser: Any) -> None:
    """The arguments of the scripts that step one engine on a seed shape (scripts/bench_compile.py, ...)."""
    parser.add_argument("--shape", default="llm-jp-3.1-1.8b")
    parser.add_argument("--layers", type=int, default=None)
    parser.add_argument("--quantize", choices=["int8", "int4"], default=None)
    parser.add_argument("--batch", type=int, default=1)


def shape_engine(args: Any, new_tokens: int, decode: Any = None) -> tuple[Transformer, Engine]:
    """A bf16 random model of args.shape (quantized if asked) and an engine holding args.batch greedy requests
    of a 32-token prompt and new_tokens each, not yet stepped."""
    model, _ = build_shape(args.shape, args.layers, torch.bfloat16, False)
    if args.quantize:
        model = quantize_model(model, args.quantize)
    params = SamplingParams(max_new_tokens=new_tokens, do_sample=False, ignore_eos=True)
    engine = Engine(model, set(), max_batch=args.batch, row_len=32 + new_tokens,
                    decode=decode(model) if decode else None)
    for _ in range(args.batch):
        engine.submit(list(range(5, 37)), params)
    return model, engine


def time_kataru(model: Transformer, prompt_len: int, new_tokens: int, batch: int,
                decode: Any = None) -> tuple[float, float]:
    """(prefill seconds, decode seconds for new_tokens - 1 per row) on the continuous-batching engine: the first
    step prefills every prompt whole (no chunks) and samples each row's first token, the rest are decode
    steps."""
    vocab = model.config.vocab_size
    engine = Engine(model, set(), max_batch=batch, row_len=prompt_len + new_tokens, decode=decode,
                    prefill_chunk=None)
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


def run_bench(target: str, dtype: str = "bfloat16", layers: int | None = None, compare: str | None = None,
              prompt_len: int = 512, new_tokens: int = 32, threads: int | None = None,
              quantize: list[str] | None = None, compile: bool = False, context: int = 16,
              device: str = "cpu", rounds: int = 1, progress: bool = True) -> dict[str, Any]:
    """context: the prompt tokens each row holds before the timed decode steps (attention reads them all).
    device: where both engines run (a seed shape is built on the CPU, then moved).
    rounds: every engine is measured this many times, taking turns; each figure is the median."""
    if rounds < 1:
        raise KataruError(f"--rounds {rounds}: measure each engine at least once")
    if new_tokens < 2:
        raise KataruError(f"--new-tokens {new_tokens}: decode speed needs at least 2 new tokens (the first comes "
                          "with the prefill)")
    if threads:
        torch.set_num_threads(threads)
    device = resolve_device(device)
    bandwidth = memory_bandwidth_gbs(device=device)  # first: its buffer is gone before the model counts to peaks
    reference = None
    if Path(target).is_dir():
        from kataru.llm import load

        model = load(target, dtype=dtype, device=device, progress=False).model
        torch_dtype = model.tok_embeddings.weight.dtype  # "auto" resolved against the checkpoint
        if compare:
            import transformers

            reference = transformers.AutoModelForCausalLM.from_pretrained(target, dtype=torch_dtype).eval()
    else:
        torch_dtype = resolve_dtype(dtype, ModelConfig.from_hf(shape_config(target, layers)))
        model, reference = build_shape(target, layers, torch_dtype, compare == "transformers")
        model = model.to(device)
    if reference is not None:
        reference = reference.to(device)
    config = model.config
    prompt_len = min(prompt_len, config.max_seq_len - new_tokens - 1)
    context = min(context, config.max_seq_len - new_tokens - 1)
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    # a decode step reads every weight except the embedding table (only one row of it)
    step_bytes = weight_bytes - model.tok_embeddings.weight.numel() * model.tok_embeddings.weight.element_size()
    if config.tie_embeddings:
        step_bytes = weight_bytes
    roofline = bandwidth * 1e9 / step_bytes

    def measure(name: str, m: Transformer, decode: Any = None) -> Result:
        if decode is not None:
            # one cache shape for every run below (a compiled step is specialised on it), and both compilations
            # (batch 1 is a special case for the compiler) done before timing
            m.setup_caches(8, max(prompt_len, context) + new_tokens)
            time_kataru(m, context, 4, 8, decode)
        time_kataru(m, 16, 4, 1, decode)  # warm up allocators and kernels
        prefill, _ = time_kataru(m, prompt_len, 1, 1, decode)
        _, decode1 = time_kataru(m, context, new_tokens, 1, decode)
        _, decode8 = time_kataru(m, context, new_tokens, 8, decode)
        steps = new_tokens - 1
        return Result(name, prompt_len / prefill, prefill, steps / decode1, 8 * steps / decode8)

    def measure_torch_mm() -> Result:  # the same engine on torch's 16-bit matmul and SDPA: what the kernels add
        with kernels.disabled():
            return measure("kataru torch mm", model)

    def measure_quantized(method: str, compiled: bool) -> Result:
        # quantized anew each round rather than kept: a 7B model's quantized copies do not fit beside it
        quantized = quantize_model(model, method, inplace=False)
        name = f"kataru {method}" + (" compiled" if compiled else "")
        return measure(name, quantized, compiled_decode(quantized) if compiled else None)

    def measure_transformers() -> Result:
        assert reference is not None
        time_transformers(reference, 16, 2, 1)
        prefill_t, _ = time_transformers(reference, prompt_len, 1, 1)
        _, decode1_t = time_transformers(reference, context, new_tokens, 1)
        _, decode8_t = time_transformers(reference, context, new_tokens, 8)
        steps = new_tokens - 1
        return Result("transformers", prompt_len / prefill_t, prefill_t, steps / decode1_t, 8 * steps / decode8_t)

    contestants: dict[str, Callable[[], Result]] = {"kataru": lambda: measure("kataru", model)}
    kernel = torch_dtype in kernels.HALF and model.tok_embeddings.weight.device.type == "cpu" and kernels.available()
    if kernel:
        contestants["kataru torch mm"] = measure_torch_mm
    if compile:
        compiled = compiled_decode(model)
        contestants["kataru compiled"] = lambda: measure("kataru compiled", model, compiled)
    for method in quantize or []:
        contestants[f"kataru {method}"] = partial(measure_quantized, method, False)
        if compile:
            contestants[f"kataru {method} compiled"] = partial(measure_quantized, method, True)
    if reference is not None:
        contestants["transformers"] = measure_transformers
    # Every engine runs once per round, in the same order, and each figure is the median of its rounds: this
    # shared machine's load swings between minutes, and rounds let every engine meet the same swings.
    runs: dict[str, list[Result]] = {name: [] for name in contestants}
    with tqdm(total=rounds * len(contestants), desc="bench", unit="run", disable=not progress) as bar:
        for _ in range(rounds):
            for name, run in contestants.items():
                bar.set_postfix_str(name)
                runs[name].append(run())
                bar.update()
    results = [median_result(r) for r in runs.values()]
    for r in results:  # the roofline is that of the unquantized weights
        quantized = any(r.engine.startswith(f"kataru {method}") for method in quantize or [])
        r.roofline_fraction = None if quantized else r.decode_b1_tok_s / roofline
    report: dict[str, Any] = {
        "target": target, "family": config.family, "dtype": str(torch_dtype).removeprefix("torch."),
        "layers": config.n_layer, "parameters": config.num_parameters(), "weight_gb": weight_bytes / 1e9,
        "prompt_tokens": prompt_len, "new_tokens": new_tokens, "decode_context": context,
        "threads": torch.get_num_threads(),
        "bandwidth_gbs": bandwidth, "roofline_decode_tok_s": roofline, "peak_rss_gb": peak_rss_bytes() / 1e9,
        "torch": torch.__version__, "half_kernel": kernel, "device": device, "rounds": rounds,
        "results": [asdict(r) for r in results],
    }
    if torch.device(device).type == "cuda":
        report["peak_gpu_gb"] = torch.cuda.max_memory_allocated(device) / 1e9
        report["gpu"] = torch.cuda.get_device_name(device)
    if reference is not None:
        k, t = results[0], results[-1]
        report["ratios"] = {"prefill": k.prefill_tok_s / t.prefill_tok_s, "decode_b1": k.decode_b1_tok_s /
                            t.decode_b1_tok_s, "decode_b8": k.decode_b8_tok_s / t.decode_b8_tok_s}
    return report


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
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise KataruError("--plot needs matplotlib: pip install matplotlib") from None
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


def main(args: Any) -> None:
    methods = [m for m in (args.quantize or "").split(",") if m]
    if args.quality:
        report = run_quality(args.target, args.dtype, methods or ["int8", "int4"], args.text)
        if args.json:
            print(json.dumps(report))
            return
        print(f"perplexity of {report['target']} on {report['tokens']} held-out tokens (windows of {report['window']})")
        for row in report["rows"]:
            print(f"{row['method']:<10}{row['perplexity']:>12.3f}{100 * row['increase']:>+9.2f}%")
        return
    report = run_bench(args.target, dtype=args.dtype, layers=args.layers, compare=args.compare,
                       prompt_len=args.prompt_tokens, new_tokens=args.new_tokens, threads=args.threads,
                       quantize=methods, compile=args.compile, context=args.context, device=args.device,
                       rounds=args.rounds)
    print(json.dumps(report) if args.json else format_table(report))
    if args.plot:
        plot(report, args.plot)


def heldout_texts(path: str | None, max_chars: int) -> list[str]:
    """The user's text file, or the Aozora Bunko works in shared/ that kataru's recipe holds out.

    kataru-tiny-ja never trained on them: `kataru data clean --val-fraction 0.02` puts a work in the
    validation split by a hash of its id, and the same rule picks them here (cleaned the same way).
    """
    if path:
        try:
            text = Path(path).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as err:
            raise KataruError(f"cannot read {path} as UTF-8 text ({err})") from None
        return [text[:max_chars]]
    from kataru.train.data import RECIPE_VAL_FRACTION, clean_aozora, is_validation, read_documents

    folder = Path(__file__).resolve().parents[2] / "shared" / "data" / "aozora"
    files = sorted(folder.glob("aozora-sample*.jsonl.gz")) if folder.is_dir() else []
    if not files:
        raise KataruError("no text for --quality: give --text FILE (held-out Japanese text)")
    texts, total = [], 0
    for doc in read_documents(files):
        if not is_validation(doc.id, RECIPE_VAL_FRACTION):
            continue
        texts.append(clean_aozora(doc.text)[: max_chars - total])
        total += len(texts[-1])
        if total >= max_chars:
            break
    return texts


@torch.inference_mode()
def perplexity(model: Transformer, token_lists: list[list[int]], window: int, desc: str = "perplexity") -> float:
    """exp(mean next-token NLL) over non-overlapping windows of each text."""
    chunks = [ids[start:start + window + 1] for ids in token_lists for start in range(0, len(ids) - 1, window)]
    chunks = [c for c in chunks if len(c) >= 2]
    nll, count = 0.0, 0
    for chunk in tqdm(chunks, desc=desc, unit="window", leave=False):
        logits = model(torch.tensor([chunk[:-1]])).float()
        target = torch.tensor(chunk[1:])
        nll += torch.nn.functional.cross_entropy(logits[0], target, reduction="sum").item()
        count += len(chunk) - 1
    return float(torch.exp(torch.tensor(nll / count)))


def run_quality(folder: str, dtype: str, methods: list[str], text: str | None, max_chars: int = 20000,
                window: int = 512) -> dict[str, Any]:
    from kataru.llm import load
    from kataru.quantize import quantize as quantize_model

    if not Path(folder).is_dir():
        raise KataruError("--quality needs a model folder (perplexity of random weights means nothing)")
    llm = load(folder, dtype=dtype, progress=False)
    tokens = [llm.tokenizer.encode(t, add_special_tokens=True) for t in heldout_texts(text, max_chars)]
    window = min(window, llm.config.max_seq_len - 1)
    rows = [{"method": dtype, "perplexity": perplexity(llm.model, tokens, window, dtype)}]
    for method in methods:  # on kataru's kernels every row is quantized as in decoding, a window at once
        ppl = perplexity(quantize_model(llm.model, method, inplace=False), tokens, window, method)
        rows.append({"method": method, "perplexity": ppl})
    for row in rows:
        row["increase"] = row["perplexity"] / rows[0]["perplexity"] - 1
    return {"target": folder, "tokens": sum(len(t) for t in tokens), "window": window, "rows": rows}
