"""The deployment files in deploy/ work as docs/deployment.md says: nginx (the real one) in front of two
`kataru serve` processes keeps a session on one backend and streams; the systemd unit's and the Kubernetes
Deployment's commands are valid `kataru serve` command lines, probing and scraping routes that exist."""

from __future__ import annotations

import json
import shlex
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import yaml
from serve_helpers import KEY, Process, wait_healthy

from kataru.cli import build_parser
from kataru.serve.loadgen import free_port

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
AUTH = {"Authorization": f"Bearer {KEY}"}


def serve_args(argv: list[str]) -> object:
    assert argv[0] == "serve", argv
    return build_parser(argv).parse_args(argv)


def test_the_systemd_unit_runs_a_valid_kataru_serve() -> None:
    unit = (DEPLOY / "kataru.service").read_text()
    start = next(line for line in unit.splitlines() if line.startswith("ExecStart="))
    argv = shlex.split(start.removeprefix("ExecStart="))
    assert argv[0].endswith("/bin/kataru")
    args = serve_args(argv[1:])
    assert args.host == "127.0.0.1"  # behind nginx or alone: loopback unless told
    grace = args.grace
    stop = next(line for line in unit.splitlines() if line.startswith("TimeoutStopSec="))
    assert float(stop.split("=")[1]) > grace  # systemd waits longer than kataru's own grace period
    assert "KillSignal=SIGTERM" in unit and "EnvironmentFile=-/etc/kataru/env" in unit


def test_the_kubernetes_deployment_probes_and_scrapes_real_routes() -> None:
    deployment, service = yaml.safe_load_all((DEPLOY / "kubernetes.yaml").read_text())
    pod = deployment["spec"]["template"]
    container = pod["spec"]["containers"][0]
    args = serve_args(container["args"])
    assert args.port == container["ports"][0]["containerPort"]
    assert args.metrics_public  # Prometheus scrapes without the key
    assert container["readinessProbe"]["httpGet"]["path"] == "/health"
    assert pod["metadata"]["annotations"]["prometheus.io/path"] == "/metrics"
    assert pod["spec"]["terminationGracePeriodSeconds"] > args.grace
    assert {e["name"] for e in container["env"]} >= {"KATARU_API_KEY"}
    assert service["spec"]["selector"] == deployment["spec"]["selector"]["matchLabels"]


class Nginx:
    """deploy/nginx.conf in a minimal nginx of its own (no root, no daemon) on a free loopback port."""

    def __init__(self, backends: list[str], folder: Path) -> None:
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        site = (DEPLOY / "nginx.conf").read_text().replace("{{PORT}}", str(self.port)).replace(
            "{{BACKENDS}}", "\n".join(f"    server {b};" for b in backends))
        (folder / "kataru.conf").write_text(site)
        temp = " ".join(f"{kind}_temp_path {folder / kind};" for kind in ("client_body", "proxy", "fastcgi",
                                                                            "uwsgi", "scgi"))
        (folder / "nginx.conf").write_text(
            f"daemon off; worker_processes 1; pid {folder / 'nginx.pid'}; error_log stderr warn;\n"
            f"events {{ worker_connections 256; }}\n"
            f"http {{ access_log off; {temp} include {folder / 'kataru.conf'}; }}\n")
        self.process = subprocess.Popen([shutil.which("nginx") or "nginx", "-p", str(folder), "-e", "stderr",
                                         "-c", str(folder / "nginx.conf")],
                                        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        wait_healthy(self.base, timeout=30, process=self.process)  # the backends are healthy already

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(10)


@pytest.fixture(scope="module")
def proxied(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Nginx, list[str]]]:
    if shutil.which("nginx") is None:
        pytest.skip("nginx is not installed (apt-get install nginx-light; scripts/system-packages.sh does it)")
    servers = [Process("--api-key", KEY), Process("--api-key", KEY)]
    backends = [f"127.0.0.1:{s.port}" for s in servers]
    nginx = None
    try:
        nginx = Nginx(backends, tmp_path_factory.mktemp("nginx"))
        yield nginx, backends
    finally:
        if nginx is not None:
            nginx.stop()
        for s in servers:
            s.stop()


def ask(nginx: Nginx, session: str | None = None, **body: object) -> httpx.Response:
    headers = {**AUTH, **({"x-session-id": session} if session else {})}
    return httpx.post(f"{nginx.base}/v1/completions", headers=headers, timeout=60,
                      json={"prompt": "こんにちは", "max_tokens": 1, **body})


def test_nginx_keeps_a_session_on_one_backend_and_spreads_the_rest(proxied: tuple[Nginx, list[str]]) -> None:
    nginx, backends = proxied
    homes = {}
    for i in range(16):
        seen = {ask(nginx, f"session-{i}").headers["x-upstream"] for _ in range(3)}
        assert len(seen) == 1, seen
        homes[i] = seen.pop()
    assert set(homes.values()) == set(backends)  # 16 sessions hashed over both
    assert {ask(nginx).headers["x-upstream"] for _ in range(6)} == set(backends)


def test_nginx_streams_health_metrics_and_keeps_the_key(proxied: tuple[Nginx, list[str]]) -> None:
    nginx, _ = proxied
    assert httpx.get(f"{nginx.base}/health", timeout=10).json()["status"] == "ok"
    assert httpx.get(f"{nginx.base}/metrics", timeout=10).status_code == 401
    assert "kataru:num_requests_running" in httpx.get(f"{nginx.base}/metrics", headers=AUTH, timeout=10).text
    assert httpx.post(f"{nginx.base}/v1/completions", json={"prompt": "a"}, timeout=10).status_code == 401
    arrivals, events = [], []
    body = {"prompt": "むかしむかし", "max_tokens": 48, "ignore_eos": True, "stream": True, "temperature": 0}
    with httpx.stream("POST", f"{nginx.base}/v1/completions", headers=AUTH, json=body, timeout=60) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        for line in r.iter_lines():
            if line.startswith("data: "):
                arrivals.append(time.monotonic())
                events.append(line[6:])
    assert events[-1] == "[DONE]"
    text = "".join(json.loads(e)["choices"][0]["text"] for e in events[:-1])
    whole = ask(nginx, prompt="むかしむかし", max_tokens=48, ignore_eos=True, temperature=0).json()
    assert text == whole["choices"][0]["text"]
    assert arrivals[-1] - arrivals[0] > 0.05 and len(events) > 40  # tokens arrived one by one, not in one block
