"""`kataru serve --replicas 2` on a local Ray cluster (started here, on 127.0.0.1): the embedded model's
answers equal a single `kataru serve`'s, requests spread, a conversation stays on one replica and hits its
prefix cache, metrics and health come through the entry, and a killed replica fails only its own requests."""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest
from serve_helpers import KEY, Process, wait_listening

from kataru.serve.loadgen import free_port

pytest.importorskip("ray.serve", reason="Ray Serve is not installed: pip install 'kataru[cluster]'")

from kataru.serve.cluster import application, merge_metrics, replica_failed, sample_values, session_key

ROOT = Path(__file__).resolve().parents[1]
AUTH = {"Authorization": f"Bearer {KEY}"}
PROMPTS = [f"{topic}について書きます。" for topic in
           ["桜", "富士山", "京都", "寿司", "新幹線", "俳句", "茶道", "将棋", "温泉", "祭り", "紅葉", "相撲",
            "漫画", "城", "雪", "海"]]


@pytest.fixture(scope="module")
def references() -> list[str]:
    """What one plain `kataru serve` answers to each prompt (greedy)."""
    single = Process("--api-key", KEY)
    try:
        client = openai.OpenAI(base_url=f"{single.base}/v1", api_key=KEY, max_retries=0, timeout=120)
        return [client.completions.create(model="kataru-tiny-ja", prompt=p, max_tokens=24, temperature=0)
                .choices[0].text for p in PROMPTS]
    finally:
        single.stop()


class Cluster:
    """`ray start --head --block` on loopback, then `kataru serve --replicas 2 --ray-address` on it."""

    def __init__(self) -> None:
        self.temp = tempfile.mkdtemp(prefix="kray-", dir="/tmp")  # short: Ray's socket paths have a length limit
        ray_port = free_port()
        # token authentication, with a token of this cluster's own for the head and the drivers that join (`ray
        # start` makes none: without one in ~/.ray from an earlier run it refuses to start)
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "token",
               "RAY_AUTH_TOKEN": secrets.token_hex(32)}
        ray = Path(sys.executable).with_name("ray")
        self.head = subprocess.Popen([str(ray), "start", "--head", "--block", "--node-ip-address", "127.0.0.1",
                                      "--port", str(ray_port), "--num-cpus", "4", "--include-dashboard", "false",
                                      "--temp-dir", self.temp, "--disable-usage-stats"],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
        wait_listening(ray_port, self.head, timeout=60)
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.serve = subprocess.Popen([sys.executable, "-m", "kataru", "serve", "--replicas", "2", "--ray-address",
                                       f"127.0.0.1:{ray_port}", "--port", str(self.port), "--api-key", KEY,
                                       "--max-num-seqs", "8"],
                                      cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
        try:
            self.wait_replicas(2, timeout=240)
        except BaseException:
            self.stop()
            raise

    def replicas(self) -> list[dict]:
        return httpx.get(f"{self.base}/replicas", headers=AUTH, timeout=10).json()["replicas"]

    def wait_replicas(self, count: int, timeout: float, not_in: set[str] = frozenset()) -> list[dict]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.serve.poll() is not None:
                raise AssertionError(f"kataru serve exited with {self.serve.returncode}: "
                                     f"{self.serve.stderr.read()[-3000:]}")
            try:
                rows = self.replicas()
                if len(rows) == count and not {r["replica"] for r in rows} & not_in:
                    return rows
            except (httpx.HTTPError, ValueError, KeyError):
                pass
            time.sleep(0.5)
        raise AssertionError(f"{count} replicas never reported to {self.base}")

    def stop(self) -> None:
        if self.serve.poll() is None:
            self.serve.send_signal(signal.SIGTERM)
            try:
                assert self.serve.wait(60) == 0
            finally:
                if self.serve.poll() is None:
                    self.serve.kill()
        self.head.send_signal(signal.SIGTERM)  # `ray start --block` takes its processes down with it
        try:
            self.head.wait(60)
        except subprocess.TimeoutExpired:
            self.head.kill()
        shutil.rmtree(self.temp, ignore_errors=True)


@pytest.fixture(scope="module")
def cluster(references: list[str]) -> Iterator[Cluster]:
    live = Cluster()
    try:
        yield live
    finally:
        live.stop()


def completion(base: str, prompt: str, headers: dict[str, str] | None = None, **body: object) -> httpx.Response:
    return httpx.post(f"{base}/v1/completions", headers={**AUTH, **(headers or {})}, timeout=120,
                      json={"prompt": prompt, "max_tokens": 24, "temperature": 0, **body})


def test_replicas_answer_like_one_server_and_share_the_load(cluster: Cluster, references: list[str]) -> None:
    client = openai.AsyncOpenAI(base_url=f"{cluster.base}/v1", api_key=KEY, max_retries=0, timeout=180)

    async def ask(prompt: str) -> tuple[str, str]:
        raw = await client.completions.with_raw_response.create(model="kataru-tiny-ja", prompt=prompt,
                                                                 max_tokens=24, temperature=0)
        return raw.parse().choices[0].text, raw.headers["x-kataru-replica"]

    async def everyone() -> list[tuple[str, str]]:
        return await asyncio.gather(*(ask(p) for p in PROMPTS))

    answers = asyncio.run(everyone())
    assert [text for text, _ in answers] == references
    served_by = {replica for _, replica in answers}
    assert served_by == {r["replica"] for r in cluster.replicas()}  # both replicas took some of the 16


def test_a_conversation_stays_on_its_replica_and_reuses_its_prefix(cluster: Cluster) -> None:
    long_text = "むかしむかし、ある山の村に、働き者のおじいさんとおばあさんが住んでいました。" * 12
    before = {r["replica"]: r["prefix_cache_hits"] for r in cluster.replicas()}
    messages = [{"role": "user", "content": long_text}]
    homes = []
    for _ in range(3):
        r = httpx.post(f"{cluster.base}/v1/chat/completions", headers={**AUTH, "x-session-id": "tale-1"},
                       json={"messages": messages, "max_tokens": 8, "temperature": 0}, timeout=120)
        assert r.status_code == 200, r.text
        homes.append(r.headers["x-kataru-replica"])
        messages += [r.json()["choices"][0]["message"], {"role": "user", "content": "続きは？"}]
    assert len(set(homes)) == 1
    home = homes[0]
    time.sleep(2.5)  # a report or two
    after = {r["replica"]: r["prefix_cache_hits"] for r in cluster.replicas()}
    assert after[home] - before[home] >= 2 * 64  # turns 2 and 3 found turn 1's prompt chunks
    assert all(after[k] == before[k] for k in after if k != home)
    row = next(r for r in cluster.replicas() if r["replica"] == home)
    assert row["prefix_cache_hit_rate"] == pytest.approx(row["prefix_cache_hits"] / row["prefix_cache_queries"])
    # OpenAI's `user` field is a session too
    users = {u: {completion(cluster.base, "こんにちは", user=u).headers["x-kataru-replica"] for _ in range(3)}
             for u in ("alice", "bob", "carol", "dave")}
    assert all(len(homes) == 1 for homes in users.values())


def test_health_metrics_and_the_key_through_the_entry(cluster: Cluster) -> None:
    assert httpx.get(f"{cluster.base}/health", timeout=10).json() == {"status": "ok", "replicas": 2}
    assert httpx.get(f"{cluster.base}/metrics", timeout=10).status_code == 401
    denied = httpx.post(f"{cluster.base}/v1/completions", json={"prompt": "a"}, timeout=10)
    assert denied.status_code == 401 and denied.json()["error"]["code"] == "invalid_api_key"
    text = httpx.get(f"{cluster.base}/metrics", headers=AUTH, timeout=10).text
    values = sample_values(text)
    assert values["kataru:replicas"] == 2
    for row in cluster.replicas():
        assert f'kataru:prefix_cache_queries_total{{replica="{row["replica"]}"}}' in values
    missing = httpx.post(f"{cluster.base}/v1/completions", headers=AUTH, json={"prompt": "a", "model": "other"})
    assert missing.status_code == 404  # the replica's own errors come through unchanged


def test_a_client_that_leaves_frees_its_row_on_the_replica(cluster: Cluster) -> None:
    body = {"prompt": "第三章 ", "max_tokens": 900, "ignore_eos": True, "stream": True}
    with httpx.stream("POST", f"{cluster.base}/v1/completions", json=body, timeout=60,
                      headers={**AUTH, "x-session-id": "leaver"}) as r:
        home = r.headers["x-kataru-replica"]
        for i, _ in enumerate(r.iter_lines()):
            if i == 10:
                break  # the client closes the connection mid-answer: through Ray's proxy, the entry, the replica
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        row = next(r for r in cluster.replicas() if r["replica"] == home)
        if row["running"] == 0:
            break
        time.sleep(0.5)
    assert row["running"] == 0
    time.sleep(1.5)
    values = sample_values(httpx.get(f"{cluster.base}/metrics", headers=AUTH, timeout=10).text)
    finished = values.get(f'kataru:request_success_total{{finished_reason="cancelled",replica="{home}"}}', 0)
    assert finished >= 1


def test_a_killed_replica_fails_only_its_own_requests(cluster: Cluster) -> None:
    LONG = 800  # tokens: long enough to be killed mid-answer
    rows = cluster.replicas()
    victim, survivor = rows[0], rows[1]
    # sessions whose hash names each replica, so that requests can be aimed
    aimed: dict[str, list[str]] = {victim["replica"]: [], survivor["replica"]: []}
    for i in range(40):
        home = completion(cluster.base, "a", {"x-session-id": f"s{i}"}, max_tokens=1).headers["x-kataru-replica"]
        aimed[home].append(f"s{i}")
    assert len(aimed[victim["replica"]]) >= 2 and len(aimed[survivor["replica"]]) >= 2

    async def stream(session: str) -> tuple[int, list[str]]:
        body = {"prompt": "第一章 ", "max_tokens": LONG, "temperature": 0, "ignore_eos": True, "stream": True}
        async with httpx.AsyncClient(timeout=180) as client, client.stream(
                "POST", f"{cluster.base}/v1/completions", json=body,
                headers={**AUTH, "x-session-id": session}) as r:
            return r.status_code, [line[6:] async for line in r.aiter_lines() if line.startswith("data: ")]

    async def whole(session: str) -> httpx.Response:
        async with httpx.AsyncClient(timeout=180) as client:
            return await client.post(f"{cluster.base}/v1/completions", headers={**AUTH, "x-session-id": session},
                                     json={"prompt": "第二章 ", "max_tokens": LONG, "ignore_eos": True})

    async def run() -> list:
        sessions = aimed[victim["replica"]][:2] + aimed[survivor["replica"]][:2]
        tasks = [asyncio.ensure_future(stream(s)) for s in sessions]
        tasks += [asyncio.ensure_future(whole(s)) for s in sessions]
        for _ in range(100):  # kill once every request is running
            await asyncio.sleep(0.2)
            running = {r["replica"]: r["running"] for r in cluster.replicas()}
            if running.get(victim["replica"]) == 4 and running.get(survivor["replica"]) == 4:
                break
        os.kill(victim["pid"], signal.SIGKILL)
        return await asyncio.gather(*tasks)

    killed_at = time.monotonic()
    results = asyncio.run(run())
    for status, events in results[:2]:  # streams on the killed replica: an error event, then [DONE]
        assert status == 200 and events[-1] == "[DONE]"
        assert json.loads(events[-2])["error"]["code"] == "replica_failed"
    for status, events in results[2:4]:  # streams on the other one: whole
        assert status == 200 and events[-1] == "[DONE]"
        assert sum(len(json.loads(e)["choices"][0]["text"]) > 0 for e in events[:-1]) > 100
        assert json.loads(events[-2])["choices"][0]["finish_reason"] == "length"
    for response in results[4:6]:
        assert response.status_code == 502 and response.json()["error"]["code"] == "replica_failed"
    for response in results[6:]:
        assert response.status_code == 200 and response.json()["usage"]["completion_tokens"] == LONG
    # Ray starts a new replica; the deployment serves again
    cluster.wait_replicas(2, timeout=120, not_in={victim["replica"]})
    assert time.monotonic() - killed_at < 150
    assert completion(cluster.base, "桜について書きます。").status_code == 200


# --- the pieces, without a cluster ---------------------------------------------------------------------
def test_session_key_prefers_the_header_then_the_user_field() -> None:
    assert session_key("abc", b'{"user": "u"}') == "abc"
    assert session_key(None, b'{"prompt": "x", "user": "u"}') == "u"
    assert session_key(None, b'{"prompt": "x"}') is None
    assert session_key(None, b'{"user": 3}') is None
    assert session_key(None, b'not json "user"') is None


def test_merged_metrics_label_each_replica() -> None:
    one = '# HELP kataru:generation_tokens_total T.\n# TYPE kataru:generation_tokens_total counter\n' \
          'kataru:generation_tokens_total 5.0\n'
    two = one.replace("5.0", "7.0")
    merged = sample_values(merge_metrics({"a": one, "b": two}).decode())
    assert merged['kataru:generation_tokens_total{replica="a"}'] == 5.0
    assert merged['kataru:generation_tokens_total{replica="b"}'] == 7.0
    assert merged["kataru:replicas"] == 2


def test_the_application_asks_ray_for_what_the_flags_say(tmp_path: Path) -> None:
    app = application(tmp_path, replicas=2, min_replicas=1, max_replicas=4, replica_cpus=3, load_options={
        "max_batch": 8}, settings={"served_model_name": "m", "max_queue": 10, "api_keys": ["k"]})
    entry = app._bound_deployment
    replica = entry.init_args[0]._bound_deployment
    assert entry.init_args[1:] == (["k"], 4 << 20, False)
    assert entry.max_ongoing_requests >= 4 * (8 + 10)  # every replica full, and room for /health
    assert replica.ray_actor_options == {"num_cpus": 3, "num_gpus": 0.0}
    assert replica.max_ongoing_requests == 8 + 10
    scaling = replica._deployment_config.autoscaling_config
    assert (scaling.min_replicas, scaling.max_replicas, scaling.initial_replicas) == (1, 4, 2)
    assert scaling.target_ongoing_requests == 8
    folder, load_options, settings = replica.init_args
    assert folder == str(tmp_path)
    assert load_options["threads"] == 3 and settings["api_keys"] == []  # the entry checks the key
    fixed = application(tmp_path, replicas=3, load_options={}, settings={"served_model_name": "m"})
    assert fixed._bound_deployment.init_args[0]._bound_deployment.num_replicas == 3


def test_a_dead_replica_is_a_502_to_retry_and_a_failing_one_a_500() -> None:
    import ray

    died = replica_failed(ray.exceptions.ActorDiedError())
    assert died.status == 502 and died.body()["error"]["code"] == "replica_failed"
    failed = replica_failed(ValueError("bad"))
    assert failed.status == 500 and "ValueError: bad" in failed.body()["error"]["message"]


@pytest.mark.parametrize("flags", [["--replicas", "0"], ["--min-replicas", "3", "--max-replicas", "2"],
                                   ["--min-replicas", "0"]])
def test_impossible_replica_counts_are_one_line_errors(flags: list[str], capsys: pytest.CaptureFixture) -> None:
    from kataru.cli import main

    assert main(["serve", *flags]) == 2
    assert capsys.readouterr().err.strip() == ("kataru: error: --replicas and --min-replicas must be at least 1, "
                                               "and --max-replicas at least --min-replicas")
