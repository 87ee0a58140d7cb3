"""A soak: a server under a changing, messy load for as long as asked, watched for what goes wrong slowly.

The load changes every phase (20 s by default) between 1 and 64 concurrent clients, each sending a mix of
requests: short chats, long streamed completions, chats over one of a few shared documents (prefix reuse),
streams the client drops after a few chunks, requests with stop strings, and bad requests (not JSON, a field
of the wrong type, an unknown model) that must get a 4xx. Every `interval` seconds it records requests done,
errors, tokens/s, the server's resident memory (when it knows the process) and its KV cache (/metrics).

Before the measured load a warm-up that climbs through every level once (10% of the time, 10 s to 2
minutes), then the server is left idle until its KV cache is back to its idle size;
the memory then is the baseline, and a fixed set of greedy probes is answered. After the load, idle again,
the same measures. The promises (`targets`): no error beyond the bad requests' 4xx, memory within 5% of the
baseline, the KV cache back to its idle size, the probes answered identically.

`python -m kataru.serve.soak --url URL [--pid PID] --minutes 30 --out soak.json --plot soak.png`, or
`scripts/soak.sh serve` (which starts the server).
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx

from kataru.errors import KataruError

LEVELS = (1, 4, 16, 64, 8, 2, 32)  # concurrent clients, phase after phase (shuffled per run)
DOCUMENTS = [  # shared prefixes: chats over the same text reuse its cached chunks
    "吾輩は猫である。名前はまだ無い。どこで生れたかとんと見当がつかぬ。何でも薄暗いじめじめした所でニャーニャー"
    "泣いていた事だけは記憶している。吾輩はここで始めて人間というものを見た。" * 3,
    "自然言語処理とは、人間の言葉をコンピュータで扱う技術です。翻訳、要約、質問応答、対話などに使われます。" * 4,
    "日本の首都は東京です。富士山は日本で一番高い山で、標高は三千七百七十六メートルです。" * 5,
]
QUESTIONS = ["要約してください。", "この文章の主題は何ですか。", "三つの要点を挙げてください。",
             "続きを書いてください。"]
PROBES = ["日本の首都はどこですか", "自然言語処理とは何か", "吾輩は猫である。"]


@dataclass
class Sample:
    t: float
    concurrency: int
    done: int  # requests answered as they should be (a 200, or the 4xx a bad request must get)
    bad_rejected: int
    cancelled: int
    errors: int
    tokens: int
    rss_mb: float | None
    kv_rows: float | None
    kv_bytes: float | None


@dataclass
class Tally:
    done: int = 0
    bad_rejected: int = 0
    cancelled: int = 0
    errors: int = 0
    tokens: int = 0
    reasons: dict[str, int] = field(default_factory=dict)

    def error(self, why: str) -> None:
        self.errors += 1
        self.reasons[why[:160]] = self.reasons.get(why[:160], 0) + 1


def rss_mb(pid: int | None) -> float | None:
    if pid is None:
        return None
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


async def gauges(client: httpx.AsyncClient) -> dict[str, float]:
    text = (await client.get("/metrics")).text
    out = {}
    for line in text.splitlines():
        if line.startswith("kataru:") and " " in line:
            name, value = line.rsplit(" ", 1)
            out[name] = float(value)
    return out


class Soak:
    def __init__(self, url: str, pid: int | None = None, api_key: str | None = None, seed: int = 0,
                 phase_seconds: float = 20.0, interval: float = 5.0, max_tokens: int = 64) -> None:
        self.url, self.pid, self.rng = url, pid, random.Random(seed)
        self.headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.phase_seconds, self.interval, self.max_tokens = phase_seconds, interval, max_tokens
        self.tally = Tally()
        self.target = 1
        self.samples: list[Sample] = []

    def client(self) -> httpx.AsyncClient:
        return httpx.AsyncClient(base_url=self.url, headers=self.headers, timeout=httpx.Timeout(300, connect=30))

    # --- one request of each kind ------------------------------------------------------------------------
    async def one(self, client: httpx.AsyncClient) -> None:
        rng = self.rng
        kind = rng.choices(["short", "long", "shared", "cancel", "stop", "bad"], [4, 2, 3, 1, 1, 1])[0]
        max_tokens = rng.randint(1, self.max_tokens)
        temperature = rng.choice([0, 0.8])
        try:
            if kind == "bad":
                await self.bad(client)
            elif kind in ("short", "shared"):
                content = rng.choice(QUESTIONS) if kind == "short" else \
                    f"{rng.choice(DOCUMENTS)}\n\n{rng.choice(QUESTIONS)}"
                r = await client.post("/v1/chat/completions", json={
                    "messages": [{"role": "user", "content": content}], "max_tokens": max_tokens,
                    "temperature": temperature})
                self.answered(r, kind)
            else:
                body: dict[str, Any] = {"prompt": rng.choice(DOCUMENTS) * rng.randint(1, 3), "stream": True,
                                        "max_tokens": max_tokens, "temperature": temperature}
                if kind == "stop":
                    body["stop"] = [rng.choice(["。", "、", "の", "\n"])]
                await self.stream(client, body, drop_after=rng.randint(1, 3) if kind == "cancel" else None)
        except httpx.HTTPError as err:
            self.tally.error(f"{kind}: {type(err).__name__}: {err}")

    def answered(self, r: httpx.Response, kind: str) -> None:
        if r.status_code != 200:
            self.tally.error(f"{kind}: HTTP {r.status_code}: {r.text[:120]}")
            return
        self.tally.done += 1
        self.tally.tokens += r.json()["usage"]["completion_tokens"]

    async def stream(self, client: httpx.AsyncClient, body: dict[str, Any], drop_after: int | None) -> None:
        events = 0
        async with client.stream("POST", "/v1/completions", json=body) as r:
            if r.status_code != 200:
                self.tally.error(f"stream: HTTP {r.status_code}: {(await r.aread())[:120]!r}")
                return
            async for line in r.aiter_lines():
                if not line.startswith("data: "):
                    continue
                if line == "data: [DONE]":
                    self.tally.done += 1
                    return
                event = json.loads(line[6:])
                if "error" in event:
                    self.tally.error(f"stream: error event: {event['error'].get('message', '')[:100]}")
                    return
                events += 1
                self.tally.tokens += 1 if event["choices"][0].get("text") else 0
                if drop_after is not None and events >= drop_after:
                    self.tally.cancelled += 1  # the client leaves; the server must cancel the request
                    return
        self.tally.error("stream: ended without [DONE]")

    async def bad(self, client: httpx.AsyncClient) -> None:
        choice = self.rng.randrange(4)
        if choice == 0:
            r = await client.post("/v1/chat/completions", content=b"{not json",
                                  headers={"content-type": "application/json"})
        elif choice == 1:
            r = await client.post("/v1/completions", json={"prompt": "x", "max_tokens": "many"})
        elif choice == 2:
            r = await client.post("/v1/chat/completions", json={"model": "no-such-model",
                                                                "messages": [{"role": "user", "content": "x"}]})
        else:
            r = await client.post("/v1/completions", json={"prompt": "x" * 5000, "max_tokens": 1 << 20})
        if 400 <= r.status_code < 500 and "error" in r.json():
            self.tally.bad_rejected += 1
        else:
            self.tally.error(f"bad request answered {r.status_code}: {r.text[:120]}")

    # --- the load ------------------------------------------------------------------------------------------
    async def load(self, seconds: float, warm_up: bool = False) -> None:
        """Clients up to the phase's level, each sending request after request, until `seconds` have passed.
        A warm-up climbs through every level once, so that the memory measured after it has seen the highest."""
        deadline = time.monotonic() + seconds
        levels = sorted(LEVELS) if warm_up else list(LEVELS)
        if not warm_up:
            self.rng.shuffle(levels)
        phase = seconds / len(levels) if warm_up else self.phase_seconds

        async def client_loop(i: int) -> None:
            async with self.client() as client:
                while time.monotonic() < deadline:
                    if i >= self.target:
                        await asyncio.sleep(0.2)
                        continue
                    await self.one(client)

        async def phases() -> None:
            n = 0
            while time.monotonic() < deadline:
                self.target = levels[n % len(levels)]
                n += 1
                await asyncio.sleep(min(phase, max(0.0, deadline - time.monotonic())))

        await asyncio.gather(phases(), *(client_loop(i) for i in range(max(LEVELS))))

    async def sampler(self, start: float, stop: asyncio.Event) -> None:
        async with self.client() as client:
            while not stop.is_set():
                await self.sample(client, start)
                try:
                    await asyncio.wait_for(stop.wait(), self.interval)
                except asyncio.TimeoutError:
                    pass

    async def sample(self, client: httpx.AsyncClient, start: float) -> Sample:
        g = await gauges(client)
        t = self.tally
        s = Sample(round(time.monotonic() - start, 2), self.target, t.done, t.bad_rejected, t.cancelled, t.errors,
                   t.tokens, rss_mb(self.pid), g.get("kataru:kv_cache_rows"), g.get("kataru:kv_cache_bytes"))
        self.samples.append(s)
        return s

    async def idle(self, idle_seconds: float) -> dict[str, float]:
        """Wait until nothing runs and the KV cache has had time to shrink; the gauges then."""
        async with self.client() as client:
            deadline = time.monotonic() + idle_seconds + 120
            quiet_since = None
            while time.monotonic() < deadline:
                g = await gauges(client)
                busy = g.get("kataru:num_requests_running", 0) + g.get("kataru:num_requests_waiting", 0)
                quiet_since = None if busy else quiet_since or time.monotonic()
                if quiet_since is not None and time.monotonic() - quiet_since > idle_seconds + 2:
                    return g
                await asyncio.sleep(0.5)
        raise KataruError(f"{self.url} never went idle (requests still running after the load)")

    async def probes(self) -> list[str]:
        async with self.client() as client:
            out = []
            for prompt in PROBES:
                r = await client.post("/v1/chat/completions", json={
                    "messages": [{"role": "user", "content": prompt}], "max_tokens": 32, "temperature": 0})
                r.raise_for_status()
                out.append(r.json()["choices"][0]["message"]["content"])
            return out

    async def run(self, seconds: float, idle_seconds: float) -> dict[str, Any]:
        start = time.monotonic()
        warm = min(120.0, max(10.0, seconds * 0.1))
        stop = asyncio.Event()
        sampler = asyncio.ensure_future(self.sampler(start, stop))
        await self.load(warm, warm_up=True)
        before = await self.idle(idle_seconds)
        baseline_rss, probes_before = rss_mb(self.pid), await self.probes()
        errors_before = self.tally.errors
        await self.load(max(1.0, seconds - warm))
        after = await self.idle(idle_seconds)
        end_rss, probes_after = rss_mb(self.pid), await self.probes()
        stop.set()
        await sampler
        async with self.client() as client:
            await self.sample(client, start)
        t = self.tally
        idle_bytes = before.get("kataru:kv_cache_bytes")
        targets = {
            "no_errors": t.errors == 0,
            "rss_within_5_percent": None if baseline_rss is None or end_rss is None else end_rss <= 1.05 * baseline_rss,
            "kv_cache_back_to_idle": after.get("kataru:kv_cache_bytes") == idle_bytes,
            "probes_identical": probes_before == probes_after,
        }
        return {"url": self.url, "seconds": round(time.monotonic() - start, 1), "warmup_seconds": warm,
                "requests_done": t.done, "bad_requests_rejected": t.bad_rejected, "cancelled_by_client": t.cancelled,
                "errors": t.errors, "errors_during_warmup": errors_before, "error_reasons": t.reasons,
                "tokens": t.tokens, "rss_mb_after_warmup": baseline_rss, "rss_mb_at_end": end_rss,
                "kv_cache_bytes_idle": idle_bytes, "kv_cache_bytes_at_end": after.get("kataru:kv_cache_bytes"),
                "kv_cache_bytes_peak": max((s.kv_bytes or 0 for s in self.samples), default=0),
                "probes": probes_before, "targets": targets, "passed": all(v is not False for v in targets.values()),
                "samples": [asdict(s) for s in self.samples]}


def soak(url: str, seconds: float, pid: int | None = None, api_key: str | None = None, idle_seconds: float = 5.0,
         seed: int = 0, phase_seconds: float = 20.0, interval: float = 5.0, max_tokens: int = 64) -> dict[str, Any]:
    """Run a soak of `seconds` against the server at `url` (its process `pid` for the memory); the report."""
    return asyncio.run(Soak(url, pid, api_key, seed, phase_seconds, interval, max_tokens).run(seconds, idle_seconds))


def plot(report: dict[str, Any], path: str) -> None:
    from kataru.charts import pyplot

    plt = pyplot()
    s = report["samples"]
    t = [x["t"] / 60 for x in s]
    fig, axes = plt.subplots(4, 1, figsize=(8, 9), sharex=True)
    axes[0].plot(t, [x["rss_mb"] for x in s])
    axes[0].set_ylabel("server RSS (MB)")
    axes[1].plot(t, [(x["kv_bytes"] or 0) / 1e6 for x in s])
    axes[1].set_ylabel("KV cache (MB)")
    rate = [0.0] + [(b["tokens"] - a["tokens"]) / max(b["t"] - a["t"], 1e-9) for a, b in itertools.pairwise(s)]
    axes[2].plot(t, rate)
    axes[2].set_ylabel("tokens/s")
    axes[3].step(t, [x["concurrency"] for x in s], where="post", label="clients")
    axes[3].plot(t, [x["errors"] for x in s], label="errors (total)")
    axes[3].set_ylabel("clients / errors")
    axes[3].set_xlabel("minutes")
    axes[3].legend(fontsize=8)
    fig.suptitle(f"soak of {report['seconds'] / 60:.0f} min: {report['requests_done']} requests, "
                 f"{report['errors']} errors, {'passed' if report['passed'] else 'FAILED'}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m kataru.serve.soak", description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", required=True)
    parser.add_argument("--pid", type=int, help="the server's process id (for its memory)")
    parser.add_argument("--minutes", type=float, default=30.0)
    parser.add_argument("--idle-seconds", type=float, default=5.0, help="the server's --kv-idle-seconds")
    parser.add_argument("--api-key")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", help="write the report (JSON) here")
    parser.add_argument("--plot", help="write a chart (PNG) here")
    args = parser.parse_args()
    report = soak(args.url, args.minutes * 60, args.pid, args.api_key, args.idle_seconds, args.seed)
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=1, ensure_ascii=False) + "\n")
    if args.plot:
        plot(report, args.plot)
    summary = {k: v for k, v in report.items() if k not in ("samples", "probes")}
    print(json.dumps(summary, indent=1, ensure_ascii=False))
    raise SystemExit(0 if report["passed"] else 1)


if __name__ == "__main__":
    main()
