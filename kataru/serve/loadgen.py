"""`kataru bench serve`: a load generator for any OpenAI-compatible server on this machine.

For each concurrency it keeps that many streamed /v1/completions requests in flight (token-id prompts of a
given length with random ids, a fixed number of new tokens, eos ignored) until `requests` have finished or
`seconds` have passed, and reports output tokens/s, requests/s and p50/p90/p99 of the time to first token
and of the time between tokens. Loopback only: it is a benchmark, not a tool to load someone's server.
`--compare llama-server` starts llama.cpp's server on the same model (a GGUF of the same weights) with as
many slots as streams and measures it right after kataru, in the same sitting.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import random
import statistics
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from kataru.charts import pyplot
from kataru.errors import KataruError


@dataclass
class Run:
    server: str
    concurrency: int
    requests: int = 0
    failed: int = 0
    output_tokens: int = 0
    seconds: float = 0.0
    ttft: list[float] = field(default_factory=list)
    itl: list[float] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)  # why requests failed (the first few distinct reasons)

    def fail(self, reason: str) -> None:
        self.failed += 1
        if reason not in self.errors and len(self.errors) < 5:
            self.errors.append(reason)

    def summary(self) -> dict[str, Any]:
        def pct(values: list[float], p: int) -> float | None:
            if not values:
                return None
            ordered = sorted(values)
            return ordered[min(len(ordered) - 1, round(p / 100 * (len(ordered) - 1)))]

        return {"server": self.server, "concurrency": self.concurrency, "requests": self.requests,
                "failed": self.failed, "output_tokens": self.output_tokens, "seconds": self.seconds,
                "output_tok_s": self.output_tokens / self.seconds if self.seconds else 0.0,
                "requests_s": self.requests / self.seconds if self.seconds else 0.0,
                **{f"ttft_p{p}_s": pct(self.ttft, p) for p in (50, 90, 99)},
                **{f"itl_p{p}_s": pct(self.itl, p) for p in (50, 90, 99)},
                "itl_mean_s": statistics.fmean(self.itl) if self.itl else None, "errors": self.errors}


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def check_loopback(url: str) -> str:
    host = urlparse(url).hostname or ""
    try:
        loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    if not loopback:
        raise KataruError(f"kataru bench serve only loads servers on this machine (127.0.0.1, localhost); "
                          f"{url} is not one")
    return url.rstrip("/")


async def one_request(client: Any, url: str, body: dict[str, Any], run: Run) -> None:
    """One streamed request: its time to first text, the times between texts, its tokens (the usage chunk's
    count, else one per text chunk)."""
    sent = time.perf_counter()
    last, first, chunks, tokens = sent, True, 0, 0
    try:
        async with client.stream("POST", f"{url}/v1/completions", json=body) as response:
            if response.status_code != 200:
                run.fail(f"HTTP {response.status_code}: {(await response.aread())[:200].decode(errors='replace')}")
                return
            async for line in response.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                event = json.loads(line[6:])
                if event.get("error"):  # an error after the headers: the request failed
                    run.fail(str(event["error"].get("message"))[:200])
                    return
                if event.get("usage"):
                    tokens = event["usage"].get("completion_tokens") or tokens
                choices = event.get("choices") or []
                if not choices or not choices[0].get("text"):
                    continue
                now = time.perf_counter()
                (run.ttft if first else run.itl).append(now - (sent if first else last))
                first, last, chunks = False, now, chunks + 1
    except Exception as err:  # a failed request is counted, the load goes on
        run.fail(f"{type(err).__name__}: {str(err)[:160]}")
        return
    run.requests += 1
    run.output_tokens += tokens or chunks


async def load(url: str, concurrency: int, requests: int, seconds: float, prompt_tokens: int, output_tokens: int,
               vocab: int, model: str | None, api_key: str | None, name: str, seed: int = 0) -> Run:
    import httpx

    rng = random.Random(seed)
    run = Run(name, concurrency)
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    limits = httpx.Limits(max_connections=concurrency + 4, max_keepalive_connections=concurrency + 4)
    started = time.perf_counter()
    issued = 0
    async with httpx.AsyncClient(timeout=httpx.Timeout(600.0), headers=headers, limits=limits) as client:
        async def worker() -> None:
            nonlocal issued
            while issued < requests and time.perf_counter() - started < seconds:
                issued += 1
                body = {"prompt": [rng.randrange(100, vocab) for _ in range(prompt_tokens)],
                        "max_tokens": output_tokens, "temperature": 0, "stream": True, "ignore_eos": True,
                        "stream_options": {"include_usage": True}, **({"model": model} if model else {})}
                await one_request(client, url, body, run)

        await asyncio.gather(*(worker() for _ in range(concurrency)))
    run.seconds = time.perf_counter() - started
    return run


def wait_ready(url: str, timeout: float = 300, process: Any = None) -> None:
    """Wait for the server's /health; a `process` (Popen) that exits first is an error at once."""
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise KataruError(f"the server for {url} exited with code {process.returncode} before it answered; run "
                              f"its command by hand to see why: {' '.join(map(str, process.args))}")
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise KataruError(f"{url}/health never answered 200 within {timeout:.0f} s")


def start_llama_server(binary: Path, gguf: Path, port: int, slots: int, context: int, threads: int) -> Any:
    """llama.cpp's server on loopback with `slots` parallel sequences (continuous batching on)."""
    if not binary.is_file():
        raise KataruError(f"no llama-server at {binary}; build llama.cpp (bench/llamacpp.sh says how)")
    if not gguf.is_file():
        raise KataruError(f"no GGUF model at {gguf}")
    return subprocess.Popen([str(binary), "-m", str(gguf), "--host", "127.0.0.1", "--port", str(port),
                             "--parallel", str(slots), "--cont-batching", "-c", str(context), "-t", str(threads),
                             "--no-webui"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def bench_serve(url: str, concurrency: list[int], requests: int, seconds: float, prompt_tokens: int,
                output_tokens: int, vocab: int, model: str | None = None, api_key: str | None = None,
                llama_server: Path | None = None, gguf: Path | None = None, threads: int = 2,
                rounds: int = 1) -> dict[str, Any]:
    """Every concurrency against kataru's server at `url` (running already), then, with llama_server and
    gguf, against llama.cpp's server started here; rounds take turns between the two. Each run records the
    memory's read bandwidth just before it (this machine's swings by up to 2x between hours, and the servers'
    ratio with it: a decode step at 8 rows streams every weight while the FMA units are busy)."""
    from kataru.bench import memory_bandwidth_gbs

    url = check_loopback(url)
    wait_ready(url)
    runs: list[dict[str, Any]] = []
    for _ in range(rounds):
        for c in concurrency:
            n = max(requests, c)
            bandwidth = memory_bandwidth_gbs(megabytes=256, repeats=3)
            run = asyncio.run(load(url, c, n, seconds, prompt_tokens, output_tokens, vocab, model, api_key, "kataru"))
            runs.append({**run.summary(), "bandwidth_gbs": bandwidth})
            if llama_server is not None and gguf is not None:
                port = urlparse(url).port or 8000
                other = f"http://127.0.0.1:{port + 1}"
                process = start_llama_server(llama_server, gguf, port + 1, c, c * (prompt_tokens + output_tokens + 8),
                                             threads)
                try:
                    wait_ready(other)
                    bandwidth = memory_bandwidth_gbs(megabytes=256, repeats=3)
                    run = asyncio.run(load(other, c, n, seconds, prompt_tokens, output_tokens, vocab, None, None,
                                           "llama-server"))
                    runs.append({**run.summary(), "bandwidth_gbs": bandwidth})
                finally:
                    process.terminate()
                    process.wait(60)
    return {"url": url, "prompt_tokens": prompt_tokens, "output_tokens": output_tokens, "rounds": rounds,
            "runs": merge(runs)}


def merge(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Medians over rounds of each (server, concurrency)."""
    groups: dict[tuple[str, int], list[dict[str, Any]]] = {}
    for r in runs:
        groups.setdefault((r["server"], r["concurrency"]), []).append(r)
    out = []
    for (server, c), group in groups.items():
        merged: dict[str, Any] = {"server": server, "concurrency": c}
        for key in group[0]:
            if key in merged:
                continue
            if key == "errors":
                merged[key] = sorted({e for g in group for e in g[key]})
                continue
            values = [g[key] for g in group if g[key] is not None]
            merged[key] = statistics.median(values) if values else None
        out.append(merged)
    return out


def format_table(report: dict[str, Any]) -> str:
    lines = [f"{report['url']}: {report['prompt_tokens']}-token prompts, {report['output_tokens']} new tokens each"
             + (f", medians of {report['rounds']} rounds" if report.get("rounds", 1) > 1 else ""),
             f"{'server':<14}{'streams':>8}{'req':>6}{'fail':>5}{'out tok/s':>11}{'req/s':>8}{'TTFT p50':>10}"
             f"{'p90':>8}{'p99':>8}{'ITL p50':>9}{'p90':>8}{'p99':>8}{'mem GB/s':>10}"]

    def ms(v: float | None) -> str:
        return "-" if v is None else f"{1000 * v:.0f}"

    for r in report["runs"]:
        lines.append(f"{r['server']:<14}{r['concurrency']:>8}{r['requests']:>6.0f}{r['failed']:>5.0f}"
                     f"{r['output_tok_s']:>11.1f}{r['requests_s']:>8.2f}{ms(r['ttft_p50_s']):>10}"
                     f"{ms(r['ttft_p90_s']):>8}{ms(r['ttft_p99_s']):>8}{ms(r['itl_p50_s']):>9}"
                     f"{ms(r['itl_p90_s']):>8}{ms(r['itl_p99_s']):>8}{r.get('bandwidth_gbs', 0):>10.1f}")
    lines.append("(TTFT and ITL in ms; mem GB/s: the memory's read bandwidth measured just before the run)")
    for r in report["runs"]:
        for error in r.get("errors") or []:
            lines.append(f"{r['server']} at {r['concurrency']} streams, a request failed: {error}")
    return "\n".join(lines)


def plot(report: dict[str, Any], path: str) -> None:
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    for server in dict.fromkeys(r["server"] for r in report["runs"]):
        rows = [r for r in report["runs"] if r["server"] == server]
        xs = [r["concurrency"] for r in rows]
        axes[0].plot(xs, [r["output_tok_s"] for r in rows], "o-", label=server)
        axes[1].plot(xs, [1000 * (r["ttft_p50_s"] or 0) for r in rows], "o-", label=server)
    axes[0].set(xlabel="concurrent streams", ylabel="output tokens/s", title="throughput")
    axes[1].set(xlabel="concurrent streams", ylabel="ms", title="time to first token (p50)")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


