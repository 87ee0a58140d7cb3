"""`kataru bench speculate MODEL`: what speculative decoding does for one conversation, grounded and
open-ended.

Workloads from the data folder: grounded (answer from, or summarise, a given Japanese document: JSQuAD
contexts with their questions, Aozora Bunko passages) and open-ended (MT-Bench-ja's writing questions). Each
prompt is decoded greedily at batch 1 without speculation, with the adaptive rule, and with every step
proposing all it can (`fixed`, what the rule saves), the three taking turns prompt by prompt; the tokens must
be the same in all three. Reported per workload: tokens/s, speed-up, acceptance (proposals kept) and the
tokens each verification makes (the kept proposals and the model's own).

Replay (`--cost-of SHAPE|FOLDER`, prompt lookup): the greedy answers replayed through the same proposer and
adaptive rule against another model's measured step costs (`StepCost`). A random-weight model of the full
llm-jp-3.1-1.8b shape accepts nothing meaningful and a small trained one has the acceptance; the replay gives
the speed-up the second's acceptance implies on the first. It is exact for prompt lookup, whose proposals
depend only on the tokens so far.

llama.cpp (`--llama-server BIN --gguf FILE`): llama-server on the same token ids, greedy, without proposals,
with its prompt lookup (`ngram-simple`) and with llama-lookup's n-gram statistics (`ngram-cache`), for its
tokens/s and acceptance.
"""

from __future__ import annotations

import json
import random
import re
import subprocess
import time
from pathlib import Path
from typing import Any

from tqdm import tqdm

from kataru.engine.scheduler import Request
from kataru.engine.speculate import Options, Speculator, StepCost, acceptance
from kataru.errors import KataruError
from kataru.files import data_folder
from kataru.sampling import SamplingParams

MODES = ("off", "adaptive", "fixed")


# --- workloads ---------------------------------------------------------------------------------------------
def workloads(limit: int, seed: int = 0) -> dict[str, list[str]]:
    """{"grounded": [...], "open-ended": [...]}: at most `limit` instructions each, from the data folder."""
    folder = data_folder("jglue")
    rng = random.Random(seed)
    squad = json.loads((folder / "jglue" / "jsquad-v1.3" / "valid-v1.3.json").read_text(encoding="utf-8"))
    paragraphs = [p for article in squad["data"] for p in article["paragraphs"]]
    rng.shuffle(paragraphs)
    grounded = [f"次の文章を読んで、質問に文章の言葉で答えてください。\n\n{p['context'].split(' [SEP] ', 1)[-1]}\n\n"
                f"質問：{p['qas'][0]['question']}" for p in paragraphs[:(limit + 1) // 2]]
    grounded += [f"次の文章を要約してください。\n\n{passage}" for passage in aozora_passages(folder, limit // 2, rng)]
    writing = []
    for line in (folder / "mt-bench-ja" / "question.jsonl").read_text(encoding="utf-8").splitlines():
        row = json.loads(line)
        if row.get("category") == "writing":
            writing.append(row["turns"][0])
    return {"grounded": grounded[:limit], "open-ended": writing[:limit]}


def aozora_passages(folder: Path, count: int, rng: random.Random, chars: int = 400) -> list[str]:
    """Passages of about `chars` characters (whole sentences) from Aozora Bunko works, cleaned of their notation."""
    from kataru.data.corpus import clean_aozora, read_documents

    files = sorted((folder / "aozora").glob("*.jsonl.gz"))
    out: list[str] = []
    for doc in read_documents(files[:1]):
        if len(out) >= count:
            break
        body = clean_aozora(doc.text)
        sentences = re.findall(r"[^。！？\n]+[。！？]", body[len(body) // 3:])
        passage = ""
        for sentence in sentences[rng.randrange(0, max(1, len(sentences) // 2)):]:
            if len(passage) + len(sentence) > chars:
                break
            passage += sentence
        if len(passage) > chars // 2:
            out.append(passage)
    return out


# --- kataru at batch 1 ---------------------------------------------------------------------------------------
def run_kataru(llm: Any, prompts: dict[str, list[str]], new_tokens: int, progress: bool = True) -> dict[str, Any]:
    """Every prompt decoded in each mode, taking turns; per workload the totals and each prompt's tokens. The time
    is the decode's, from the first token (which the prefill gives, the same in every mode) to the last."""
    spec, engine = llm.engine.speculator, llm.engine
    method = spec.options.method
    out: dict[str, Any] = {}

    def once(ids: list[int], mode: str) -> Any:
        spec.options.adaptive = mode != "fixed"
        params = SamplingParams(max_new_tokens=new_tokens, do_sample=False,
                                speculate="off" if mode == "off" else method)
        return engine.wait(engine.submit(ids, params))

    encoded = {name: [llm.encode_prompt(p) for p in items] for name, items in prompts.items()}  # the model's format
    first = next(p for ps in encoded.values() for p in ps)
    for mode in MODES:  # warm-up: first calls, the step costs measured
        once(first, mode)
    bar = tqdm(total=sum(len(p) for p in prompts.values()) * len(MODES), desc="kataru", disable=not progress)
    for name, items in encoded.items():
        totals = {mode: {"tokens": 0, "seconds": 0.0, "draft_tokens": 0, "accepted_tokens": 0, "steps": 0}
                  for mode in MODES}
        answers, identical = [], True
        for i, ids in enumerate(items):
            order = MODES[i % 3:] + MODES[:i % 3]  # each mode first as often as the others
            tokens = {}
            for mode in order:
                request = once(ids, mode)
                if request.finish_reason == "error":
                    raise KataruError(request.error or "the engine failed")
                t = totals[mode]
                t["tokens"] += len(request.tokens) - 1
                t["seconds"] += request.times["finished"] - request.times["first_token"]
                if request.spec is not None:
                    t["draft_tokens"] += request.spec.proposed
                    t["accepted_tokens"] += request.spec.accepted
                    t["steps"] += request.spec.steps
                tokens[mode] = request.tokens
                bar.update()
            identical &= len({tuple(t) for t in tokens.values()}) == 1
            answers.append({"prompt_token_ids": ids, "token_ids": tokens["off"]})
        out[name] = {"prompts": len(items), "identical": identical, "answers": answers,
                     "modes": {mode: summary(t) for mode, t in totals.items()}}
        base = out[name]["modes"]["off"]["tok_s"]
        for mode in MODES:
            out[name]["modes"][mode]["speedup"] = out[name]["modes"][mode]["tok_s"] / base if base else None
    bar.close()
    return out


def summary(t: dict[str, Any]) -> dict[str, Any]:
    """tokens/s of the decode (after the first token), acceptance, and the tokens each verification made."""
    steps = t["steps"]
    return {"tokens": t["tokens"], "seconds": round(t["seconds"], 4),
            "tok_s": t["tokens"] / t["seconds"] if t["seconds"] else 0.0,
            **acceptance(t["draft_tokens"], t["accepted_tokens"]), "verifications": steps,
            "tokens_per_verification": round((t["accepted_tokens"] + steps) / steps, 3) if steps else None}


# --- replay on another model's costs ---------------------------------------------------------------------------
def replay(answers: list[dict[str, Any]], cost: StepCost, options: Options, adaptive: bool | None) -> dict[str, Any]:
    """Decode seconds each answer implies under `cost`: plainly (adaptive None), or verifying prompt-lookup
    proposals chosen by the adaptive rule (or all of them), every step's rows priced by `cost`."""
    seconds = tokens = proposed = kept = steps = 0.0
    spec = Speculator(None, Options("ngram", options.tokens, options.min_ngram, options.max_ngram,
                                    adaptive=bool(adaptive)))  # type: ignore[arg-type]  # one engine, answer after answer
    spec.costs["1"] = cost
    for answer in answers:
        prompt, target = answer["prompt_token_ids"], answer["token_ids"]
        if len(target) < 2:
            continue
        request = Request(list(prompt), SamplingParams(max_new_tokens=len(target), do_sample=False,
                                                       speculate=None if adaptive is not None else "off"))
        request.tokens = [target[0]]
        request.prefilled = len(prompt)
        while len(request.tokens) < len(target):
            (proposal,) = spec.propose([request], 1 << 30, 1 << 30)
            k = len(proposal.tokens)
            seconds += cost.seconds(1 + k, (1 + k) * request.length + k * (k + 1) // 2)
            done = len(request.tokens)
            hit = 0
            while hit < k and proposal.tokens[hit] == target[done + hit]:
                hit += 1
            request.tokens += target[done:done + hit + 1]
            spec.verified(request, proposal, hit)
            steps += 1
            proposed += k
            kept += hit
        tokens += len(target) - 1
    return {"tokens": int(tokens), "seconds": seconds, "tok_s": tokens / seconds if seconds else 0.0,
            "steps": int(steps), **acceptance(int(proposed), int(kept))}


def replays(results: dict[str, Any], cost: StepCost, options: Options) -> dict[str, Any]:
    out = {}
    for name, result in results.items():
        modes = {"off": replay(result["answers"], cost, options, None),
                 "adaptive": replay(result["answers"], cost, options, True),
                 "fixed": replay(result["answers"], cost, options, False)}
        for mode in modes.values():
            mode["speedup"] = mode["tok_s"] / modes["off"]["tok_s"] if modes["off"]["tok_s"] else None
        out[name] = modes
    return out


def cost_model(target: str, dtype: str) -> tuple[StepCost, dict[str, Any]]:
    """The step costs of a seed shape with random weights (or a model folder), verifying a batch of one."""
    from kataru import dispatch
    from kataru.config import ModelConfig
    from kataru.runtime import resolve_dtype
    from kataru.shapes import SHAPES, random_model, shape_config

    if target in SHAPES:
        config = ModelConfig.from_hf(shape_config(target))
        model = random_model(config, resolve_dtype(dtype, config))
        dispatch.prepare(model, progress=True)
    else:
        import kataru

        model = kataru.load(target, dtype=dtype).model
    cost = StepCost.of(model, 1)
    return cost, {"target": target, "ms": {n: round(t * 1e3, 2) for n, t in cost.base.items()},
                  "context_us_per_token": round(cost.per_token * 1e6, 3)}


# --- llama.cpp ---------------------------------------------------------------------------------------------------
LLAMA_MODES = {"off": [], "ngram-simple": ["--spec-type", "ngram-simple", "--spec-ngram-simple-size-n", "{n}",
                                           "--spec-ngram-simple-size-m", "{k}"],
               "ngram-cache": ["--spec-type", "ngram-cache", "--spec-draft-n-max", "{k}"]}


def run_llama_server(binary: str, gguf: str, prompts: dict[str, list[list[int]]], new_tokens: int, k: int, n: int,
                     threads: int, progress: bool = True) -> dict[str, Any]:
    """llama-server on the very token ids kataru decodes (its /completion takes ids), greedy: without proposals,
    with prompt lookup (`ngram-simple`: the last n tokens looked up, the m after them proposed) and with
    llama-lookup's n-gram statistics (`ngram-cache`); its own decode tokens/s and acceptance."""
    import httpx

    from kataru.serve.loadgen import free_port, wait_ready

    servers, out = {}, {}
    try:
        for mode, extra in LLAMA_MODES.items():
            port = free_port()
            args = [a.format(n=n, k=k) for a in extra]
            servers[mode] = (f"http://127.0.0.1:{port}", subprocess.Popen(
                [binary, "-m", gguf, "--port", str(port), "--host", "127.0.0.1", "-t", str(threads), "-c", "2048",
                 "--parallel", "1", *args], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        for url, process in servers.values():
            wait_ready(url, process=process)
        bar = tqdm(total=sum(len(p) for p in prompts.values()) * len(servers), desc="llama.cpp", disable=not progress)
        for name, items in prompts.items():
            totals = {m: {"tokens": 0, "seconds": 0.0, "draft_tokens": 0, "accepted_tokens": 0} for m in servers}
            for i, ids in enumerate(items):
                modes = list(servers)
                for mode in modes[i % len(modes):] + modes[:i % len(modes)]:
                    reply = httpx.post(f"{servers[mode][0]}/completion", timeout=600, json={
                        "prompt": ids, "n_predict": new_tokens, "temperature": 0, "cache_prompt": False})
                    if reply.status_code != 200:
                        raise KataruError(f"llama-server ({mode}) answered {reply.status_code}: {reply.text[:200]}")
                    timings = reply.json()["timings"]
                    t = totals[mode]
                    t["tokens"] += max(timings["predicted_n"] - 1, 0)
                    t["seconds"] += timings["predicted_ms"] / 1e3
                    t["draft_tokens"] += timings.get("draft_n", 0)
                    t["accepted_tokens"] += timings.get("draft_n_accepted", 0)
                    bar.update()
            modes_out = {m: {"tokens": t["tokens"], "seconds": round(t["seconds"], 4),
                             "tok_s": t["tokens"] / t["seconds"] if t["seconds"] else 0.0,
                             **acceptance(t["draft_tokens"], t["accepted_tokens"])} for m, t in totals.items()}
            for m in modes_out.values():
                m["speedup"] = m["tok_s"] / modes_out["off"]["tok_s"] if modes_out["off"]["tok_s"] else None
            out[name] = modes_out
        bar.close()
    finally:
        for _, process in servers.values():
            process.terminate()
            process.wait(60)
    return out


# --- the report ----------------------------------------------------------------------------------------------------
def run(target: str | None, speculate: str, tokens: int, ngram: tuple[int, int], limit: int, new_tokens: int,
        dtype: str = "auto", quantize: str | None = None, cost_of: str | None = None, llama_server: str | None = None,
        gguf: str | None = None, threads: int = 2, progress: bool = True) -> dict[str, Any]:
    import torch

    import kataru
    from kataru import dispatch

    if (llama_server is None) != (gguf is None):
        raise KataruError("--llama-server and --gguf go together: llama.cpp's llama-server binary and the GGUF of "
                          "the same weights")
    llm = kataru.load(target, dtype=dtype, quantize=quantize, speculate=speculate, speculate_tokens=tokens,
                      speculate_ngram=ngram, max_batch=1)
    prompts = workloads(limit)
    report: dict[str, Any] = {
        "model": str(llm.folder), "dtype": str(llm.dtype).removeprefix("torch."), "quantization": llm.quantization,
        "speculate": speculate, "speculate_tokens": tokens, "ngram": list(ngram), "new_tokens": new_tokens,
        "threads": torch.get_num_threads(), "cpu": dispatch.cpu()["model"],
        "date": time.strftime("%Y-%m-%d"),
        "kataru": run_kataru(llm, prompts, new_tokens, progress),
    }
    if cost_of is not None:
        if not speculate.startswith("ngram"):
            raise KataruError("--cost-of replays prompt lookup (--speculate ngram): a draft's proposals need the draft")
        cost, shape = cost_model(cost_of, "bfloat16" if dtype == "auto" else dtype)
        report["replay"] = {"cost": shape, "workloads": replays(report["kataru"], cost, llm.engine.speculator.options)}
    if llama_server is not None:
        ids = {name: [a["prompt_token_ids"] for a in result["answers"]] for name, result in report["kataru"].items()}
        report["llama.cpp"] = run_llama_server(llama_server, gguf or "", ids, new_tokens, tokens, ngram[0] + 1,
                                               threads, progress)
    return report


def format_table(report: dict[str, Any]) -> str:
    lines = [f"{report['model']} ({report['dtype']}), --speculate {report['speculate']} (at most "
             f"{report['speculate_tokens']} per step), greedy, batch 1, {report['new_tokens']} new tokens at most",
             f"{'workload':<12} {'engine':<22} {'tok/s':>8} {'speed-up':>9} {'accepted':>9} {'per verif.':>10}"]

    def row(workload: str, engine: str, m: dict[str, Any]) -> str:
        rate = "" if m.get("acceptance_rate") is None else f"{100 * m['acceptance_rate']:.0f}%"
        per = m.get("tokens_per_verification")
        speed = m.get("speedup")
        return (f"{workload:<12} {engine:<22} {m['tok_s']:>8.1f} {'' if speed is None else f'{speed:.2f}x':>9} "
                f"{rate:>9} {'' if per is None else f'{per:.2f}':>10}")

    for name, result in report["kataru"].items():
        for mode, m in result["modes"].items():
            lines.append(row(name, f"kataru {mode}", m))
        if "llama.cpp" in report:
            for mode, m in report["llama.cpp"][name].items():
                lines.append(row(name, f"llama.cpp {mode}", m))
        lines.append(f"{'':<12} same tokens in every kataru mode: {'yes' if result['identical'] else 'NO'}")
    if "replay" in report:
        shape = report["replay"]["cost"]
        lines.append(f"replayed on the step costs of {shape['target']} (ms per verification of n rows: "
                     + ", ".join(f"{n}: {t}" for n, t in shape["ms"].items()) + ")")
        for name, modes in report["replay"]["workloads"].items():
            for mode, m in modes.items():
                lines.append(row(name, f"implied {mode}", m))
    return "\n".join(lines)


def plot(report: dict[str, Any], path: str) -> None:
    from kataru.charts import pyplot

    plt = pyplot()
    names = list(report["kataru"])
    bars: dict[str, list[float]] = {f"kataru {m}": [report["kataru"][n]["modes"][m]["tok_s"] for n in names]
                                    for m in MODES}
    if "llama.cpp" in report:
        for m in LLAMA_MODES:
            bars[f"llama.cpp {m}"] = [report["llama.cpp"][n][m]["tok_s"] for n in names]
    fig, ax = plt.subplots(figsize=(8, 4))
    width = 0.8 / len(bars)
    for i, (label, values) in enumerate(bars.items()):
        ax.bar([x + i * width for x in range(len(names))], values, width, label=label)
    ax.set_xticks([x + 0.4 - width / 2 for x in range(len(names))], names)
    ax.set_ylabel("tokens/s (batch 1, greedy)")
    ax.set_title(f"speculative decoding: {Path(report['model']).name}, {report['date']}")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
