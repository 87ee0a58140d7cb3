"""`kataru serve --replicas N`: kataru's OpenAI app as replicas on Ray Serve, behind one HTTP entry.

Two deployments. `Replica` holds one engine and model copy and runs the same FastAPI app as a single `kataru
serve`, called through Ray with the request's method, path, headers and body; it streams back the response's
start and body pieces. `Entry` is the HTTP ingress: it checks the API key and body size, picks the routing
key (the `x-session-id` header, else the body's `user` field) and forwards. Requests with a key go to the
replica its consistent hash names (`SessionRouter`), so a conversation's turns meet the prefix cache that
holds their history; requests without one go to the least busy replica. Replicas report their metrics to a
`Board` actor every second; the entry serves `/health`, `/metrics` (every replica's samples, labelled
`replica`) and `/replicas` from it. A replica that dies ends its own requests with a 502 (or, when the
stream has begun, an error event); Ray starts a new one.
"""

import asyncio
import json
import logging
import os
import random
import socket
import threading
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import ray
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from ray import serve
from ray.serve.config import RequestRouterConfig
from ray.serve.experimental.consistent_hash_router import ConsistentHashRouter

from kataru.serve.admission import admit, too_large
from kataru.serve.app import Settings, create_app
from kataru.serve.protocol import APIError

log = logging.getLogger("kataru.serve")
APP = "kataru"
NAMESPACE = "kataru"
REPORT_EVERY = 1.0  # seconds between a replica's reports to the board
STALE_AFTER = 3.0  # a replica silent this long (three reports missed) is counted as gone
SESSION_HEADER = "x-session-id"


class SessionRouter(ConsistentHashRouter):
    """A request with a session goes where the consistent hash of its key points (then its ring successors
    when that replica is full); one without goes to the replica with the shortest queue."""

    async def choose_replicas(self, candidate_replicas: list[Any], pending_request: Any = None) -> list[list[Any]]:
        if pending_request is not None and not pending_request.metadata.session_id:
            # One replica per rank, shortest known queue first (unknown counts as empty, ties at random): Ray
            # given them all at once takes any replica with a cached queue length before probing the others,
            # so a burst could all go to the one replica it had heard of.
            def queue(replica: Any) -> tuple[int, float]:
                return self._replica_queue_len_cache.get(replica.replica_id) or 0, random.random()

            return [[replica] for replica in sorted(candidate_replicas, key=queue)]
        return await super().choose_replicas(candidate_replicas, pending_request)


@ray.remote(num_cpus=0)
class Board:
    """The replicas' latest reports (pid, node, Prometheus text), kept by replica id."""

    def __init__(self) -> None:
        self.reports: dict[str, dict[str, Any]] = {}

    def put(self, replica: str, report: dict[str, Any]) -> None:
        self.reports[replica] = {**report, "seen": time.time()}

    def drop(self, replica: str) -> None:
        self.reports.pop(replica, None)

    def live(self) -> dict[str, dict[str, Any]]:
        now = time.time()
        self.reports = {k: v for k, v in self.reports.items() if now - v["seen"] < STALE_AFTER}
        return self.reports


def board_name(app: str) -> str:
    return f"kataru-board:{app}"


# --- a replica -----------------------------------------------------------------------------------------
@serve.deployment(name="Replica")
class Replica:
    """One engine and model copy running kataru's own app; loaded before Ray routes anything to it."""

    def __init__(self, folder: str, load_options: dict[str, Any], settings: dict[str, Any]) -> None:
        import torch

        from kataru.llm import load

        threads = int(load_options.pop("threads", 0) or 0)
        if threads:
            torch.set_num_threads(threads)
        context = serve.get_replica_context()
        self.id = context.replica_id.unique_id
        self.app_name = context.app_name
        llm = load(Path(folder), progress=False, **load_options)
        self.app = create_app(lambda: llm, Settings(**settings))
        self.server = self.app.state.server
        self.server.llm = llm  # loaded here, so the app's background loading is not needed
        self.stopped = threading.Event()
        threading.Thread(target=self.report_loop, name="kataru-report", daemon=True).start()
        log.warning("kataru replica %s (pid %d) ready", self.id, os.getpid())

    def report_loop(self) -> None:
        board = None
        while not self.stopped.wait(REPORT_EVERY):
            try:
                board = board or ray.get_actor(board_name(self.app_name), namespace=NAMESPACE)
                board.put.remote(self.id, {"pid": os.getpid(), "node": socket.gethostname(),
                                           "metrics": self.server.metrics.render().decode()})
            except Exception:  # the entry (and its board) may be restarting: look it up again next time
                board = None

    def __del__(self) -> None:
        self.stopped.set()

    async def forward(self, method: str, path: str, query: str, headers: list[tuple[str, str]],
                      body: bytes) -> AsyncIterator[dict[str, Any] | bytes]:
        """Run the request through the app; yield {status, headers} first, then the body's pieces. Closing
        this generator (the client went away) tells the app the client disconnected, which cancels the
        engine requests."""
        messages: asyncio.Queue[dict[str, Any] | None] = asyncio.Queue()
        disconnected = asyncio.Event()
        body_sent = False

        async def receive() -> dict[str, Any]:
            nonlocal body_sent
            if not body_sent:
                body_sent = True
                return {"type": "http.request", "body": body, "more_body": False}
            await disconnected.wait()
            return {"type": "http.disconnect"}

        async def send(message: dict[str, Any]) -> None:
            await messages.put(message)

        scope = {"type": "http", "asgi": {"version": "3.0", "spec_version": "2.3"}, "http_version": "1.1",
                 "method": method, "scheme": "http", "path": path, "raw_path": path.encode(),
                 "query_string": query.encode("latin-1"), "root_path": "", "client": ("127.0.0.1", 0),
                 "server": ("127.0.0.1", 0),
                 "headers": [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in headers]}
        task = asyncio.ensure_future(self.app(scope, receive, send))
        task.add_done_callback(lambda _: messages.put_nowait(None))
        try:
            while (message := await messages.get()) is not None:
                if message["type"] == "http.response.start":
                    raw = [(k.decode("latin-1"), v.decode("latin-1")) for k, v in message.get("headers", [])]
                    yield {"status": message["status"], "headers": [*raw, ("x-kataru-replica", self.id)]}
                elif message["type"] == "http.response.body":
                    if message.get("body"):
                        yield message["body"]
                    if not message.get("more_body", False):
                        break
            if task.done() and task.exception() is not None:
                raise task.exception()  # type: ignore[misc]
        finally:
            disconnected.set()
            await asyncio.wait({task}, timeout=5)
            task.cancel()

    def check_health(self) -> None:
        if self.server.llm is None:
            raise RuntimeError("the model is not loaded")


# --- the entry (its helpers first: serve.ingress captures the module's names as the class is made) ---
def replica_failed(err: BaseException) -> APIError:
    """A replica that died (Ray replaces it): 502, worth a retry. Anything else: the replica's own 500."""
    if isinstance(err, ray.exceptions.RayActorError | ray.exceptions.ActorUnavailableError):
        return APIError(502, f"the replica serving this request stopped ({type(err).__name__}); the deployment "
                             "replaces it: retry the request", type="server_error", code="replica_failed")
    return APIError(500, f"the replica failed: {type(err).__name__}: {err}", type="server_error")


def session_key(header: str | None, body: bytes) -> str | None:
    """The conversation a request belongs to: the session header, else OpenAI's `user` field."""
    if header:
        return header
    if b'"user"' not in body:
        return None
    try:
        user = json.loads(body).get("user")
    except (ValueError, AttributeError):
        return None
    return user if isinstance(user, str) and user else None


def sample_values(text: str) -> dict[str, float]:
    """Prometheus text as {sample name with labels: value} (labels sorted), for the replica table."""
    from prometheus_client.parser import text_string_to_metric_families

    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            labels = ",".join(f'{k}="{v}"' for k, v in sorted(s.labels.items()))
            out[s.name + (f"{{{labels}}}" if labels else "")] = s.value
    return out


def merge_metrics(texts: dict[str, str]) -> bytes:
    """Every replica's Prometheus text as one exposition, each sample labelled with its replica, plus
    `kataru:replicas` (how many report)."""
    from prometheus_client import CollectorRegistry, generate_latest
    from prometheus_client.core import GaugeMetricFamily, Metric
    from prometheus_client.parser import text_string_to_metric_families
    from prometheus_client.samples import Sample

    families: dict[str, Metric] = {}
    for replica, text in sorted(texts.items()):
        for family in text_string_to_metric_families(text):
            merged = families.setdefault(family.name, Metric(family.name, family.documentation, family.type))
            merged.samples += [Sample(s.name, {**s.labels, "replica": replica}, s.value, s.timestamp, s.exemplar)
                               for s in family.samples]

    class Collector:
        def collect(self) -> Any:
            yield GaugeMetricFamily("kataru:replicas", "Replicas reporting to the entry.", value=len(texts))
            yield from families.values()

    registry = CollectorRegistry()
    registry.register(Collector())  # type: ignore[arg-type]
    return generate_latest(registry)


entry_app = FastAPI(title="kataru (replicas)")


@serve.deployment(name="Entry", ray_actor_options={"num_cpus": 0})
@serve.ingress(entry_app)
class Entry:
    """The one HTTP entry: key, size, routing key, then the request is forwarded to a replica."""

    def __init__(self, replicas: Any, api_keys: list[str], max_body_bytes: int, metrics_public: bool) -> None:
        self.replicas = replicas
        self.api_keys, self.max_body_bytes, self.metrics_public = api_keys, max_body_bytes, metrics_public
        app = serve.get_replica_context().app_name
        self.board = Board.options(name=board_name(app), namespace=NAMESPACE, get_if_exists=True).remote()

    def guard(self, request: Request) -> None:
        """The checks a single server's Guard makes before reading a request, with the same rules."""
        admit(request.url.path, request.headers, self.api_keys, self.max_body_bytes, self.metrics_public)

    @entry_app.get("/health")
    async def health(self) -> JSONResponse:
        live = await self.board.live.remote()
        status = 200 if live else 503
        return JSONResponse({"status": "ok" if live else "loading", "replicas": len(live)}, status_code=status)

    @entry_app.get("/replicas")
    async def replica_list(self, request: Request) -> Response:
        return await self.answer(request, self.replica_rows)

    @entry_app.get("/metrics")
    async def metrics(self, request: Request) -> Response:
        return await self.answer(request, self.merged_metrics)

    async def answer(self, request: Request, make: Any) -> Response:
        try:
            self.guard(request)
        except APIError as err:
            return JSONResponse(err.body(), status_code=err.status, headers=err.headers)
        return await make()

    async def replica_rows(self) -> JSONResponse:
        live = await self.board.live.remote()
        rows = []
        for replica, report in sorted(live.items()):
            values = sample_values(report["metrics"])
            queries = values.get("kataru:prefix_cache_queries_total", 0.0)
            hits = values.get("kataru:prefix_cache_hits_total", 0.0)
            rows.append({"replica": replica, "pid": report["pid"], "node": report["node"],
                         "running": values.get("kataru:num_requests_running", 0.0),
                         "waiting": values.get("kataru:num_requests_waiting", 0.0),
                         "requests": sum(v for k, v in values.items() if k.startswith("kataru:request_success_total")),
                         "prefix_cache_queries": queries, "prefix_cache_hits": hits,
                         "prefix_cache_hit_rate": hits / queries if queries else 0.0})
        return JSONResponse({"replicas": rows})

    async def merged_metrics(self) -> Response:
        live = await self.board.live.remote()
        return Response(merge_metrics({k: v["metrics"] for k, v in live.items()}),
                        media_type="text/plain; version=0.0.4; charset=utf-8")

    @entry_app.api_route("/{path:path}", methods=["GET", "POST"])
    async def forward(self, request: Request, path: str) -> Response:
        try:
            self.guard(request)
            body = await request.body()
            if len(body) > self.max_body_bytes:
                raise too_large(len(body), self.max_body_bytes)
        except APIError as err:
            return JSONResponse(err.body(), status_code=err.status, headers=err.headers)
        key = session_key(request.headers.get(SESSION_HEADER), body)
        handle = self.replicas.options(method_name="forward", stream=True,
                                       **({"session_id": key} if key else {}))
        headers = [(k, v) for k, v in request.headers.items() if k not in ("host", "content-length")]
        stream = handle.remote(request.method, "/" + path, request.url.query, headers, body)
        try:
            start = await stream.__anext__()
        except asyncio.CancelledError:
            stream.cancel()
            raise
        except Exception as err:
            stream.cancel()
            failure = replica_failed(err)
            return JSONResponse(failure.body(), status_code=failure.status)
        replica = dict(start["headers"]).get("x-kataru-replica", "")
        sse = any(k.lower() == "content-type" and v.startswith("text/event-stream") for k, v in start["headers"])

        async def rest() -> AsyncIterator[bytes]:
            try:
                async for piece in stream:
                    yield piece
            except Exception as err:  # the replica died mid-answer: say so in the stream's own terms
                self.board.drop.remote(replica)
                if sse:
                    yield f"data: {json.dumps(replica_failed(err).body())}\n\ndata: [DONE]\n\n".encode()
                else:
                    raise
            finally:
                stream.cancel()

        # Ray's proxy sets its own x-request-id (the completion's id is in the body)
        kept = [(k, v) for k, v in start["headers"]
                if k.lower() not in ("content-length", "transfer-encoding", "x-request-id")]
        response = StreamingResponse(rest(), status_code=start["status"])
        response.raw_headers = [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in kept]
        return response


# --- deploying -----------------------------------------------------------------------------------------
def application(folder: Path, *, replicas: int, min_replicas: int | None = None, max_replicas: int | None = None,
                target_ongoing: int | None = None, replica_cpus: float = 1.0, replica_gpus: float = 0.0,
                load_options: dict[str, Any], settings: dict[str, Any], grace: float = 30.0) -> Any:
    """The Ray Serve application: `serve.run(application(...), name=..., route_prefix="/")`."""
    max_num_seqs = load_options.get("max_batch", 16)
    options: dict[str, Any] = {
        "ray_actor_options": {"num_cpus": replica_cpus, "num_gpus": replica_gpus},
        "max_ongoing_requests": max_num_seqs + settings.get("max_queue", 256),  # kataru queues and says 429
        "graceful_shutdown_timeout_s": grace,
        "request_router_config": RequestRouterConfig(request_router_class=SessionRouter,
                                                     request_router_kwargs={"num_fallback_replicas": 1}),
    }
    if min_replicas is not None or max_replicas is not None:
        low = replicas if min_replicas is None else min_replicas
        options["autoscaling_config"] = {
            "min_replicas": low, "max_replicas": max(max_replicas or replicas, low), "initial_replicas": replicas,
            "target_ongoing_requests": target_ongoing or max_num_seqs}
    else:
        options["num_replicas"] = replicas
    threads = max(1, int(replica_cpus)) if replica_gpus == 0 else 0
    replica = Replica.options(**options).bind(str(folder), {**load_options, "threads": threads},
                                              {**settings, "api_keys": []})
    # Ray admits 5 requests per replica unless told: the entry must take what all replicas can hold, and
    # room beside them for /health and /metrics
    most = options.get("autoscaling_config", {}).get("max_replicas", replicas)
    entry = Entry.options(max_ongoing_requests=most * options["max_ongoing_requests"] + 64)
    return entry.bind(replica, settings.get("api_keys", []), settings.get("max_body_bytes", 4 << 20),
                      settings.get("metrics_public", False))
