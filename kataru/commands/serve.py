"""`kataru serve`: the OpenAI API (chat, completions, tokenize, models, health, metrics) on one engine."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

from kataru.commands.common import DTYPE_HELP, speculation

FORMATTER = argparse.ArgumentDefaultsHelpFormatter


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", nargs="?", help="local Hugging Face checkpoint folder (default: the embedded "
                                            "kataru-tiny-ja)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    p.add_argument("--port", type=int, default=8000, help="port to listen on")
    p.add_argument("--api-key", action="append", default=[],
                   help="require this bearer key (repeatable; also $KATARU_API_KEY)")
    p.add_argument("--served-model-name", help="the model's name in the API (default: the folder's name)")
    p.add_argument("--dtype", default="auto", help=DTYPE_HELP)
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    p.add_argument("--quantize", choices=["int8", "int4"], help="weight-only quantization after loading")
    p.add_argument("--compile", action="store_true", help="torch.compile the decode step")
    p.add_argument("--batch-invariant", action="store_true",
                   help="one matmul path for every batch size: a request decodes to the same bits alone or batched")
    p.add_argument("--max-num-seqs", type=int, default=16, help="requests decoded together at most")
    p.add_argument("--max-queue", type=int, default=256, help="requests waiting at most; beyond, 429")
    p.add_argument("--kv-budget", type=int, help="KV-cache tokens reserved at most (default: max-num-seqs x the "
                                                  "context)")
    p.add_argument("--kv-idle-tokens", type=int, help="KV-cache tokens kept once the server is idle (default: one "
                                                      "context's worth)")
    p.add_argument("--kv-idle-seconds", type=float, default=30.0,
                   help="seconds without requests before the KV cache shrinks to --kv-idle-tokens")
    p.add_argument("--max-body-bytes", type=int, default=4 << 20, help="larger request bodies get 413")
    p.add_argument("--grace", type=float, default=30.0, help="seconds in-flight requests get after SIGTERM")
    p.add_argument("--log-prompts", action="store_true", help="write prompts into the access log")
    p.add_argument("--metrics-public", action="store_true", help="serve /metrics without the API key")
    from kataru.commands.common import add_speculation

    add_speculation(p)
    scale = p.add_argument_group("replicas on Ray Serve (pip install 'kataru[cluster]')")
    scale.add_argument("--replicas", type=int, metavar="N", help="serve N replicas, each with its own engine and "
                                                                 "model copy, behind one HTTP entry")
    scale.add_argument("--ray-address", metavar="HOST:PORT", help="join this Ray cluster; none: start a local one")
    scale.add_argument("--min-replicas", type=int, metavar="N", help="autoscale: replicas at least (on queue depth)")
    scale.add_argument("--max-replicas", type=int, metavar="N", help="autoscale: replicas at most")
    scale.add_argument("--target-ongoing", type=int, metavar="N", help="autoscale: requests per replica to aim for; "
                                                                       "none: --max-num-seqs")
    scale.add_argument("--replica-cpus", type=float, default=1.0, help="CPUs reserved per replica (its torch "
                                                                      "threads)")
    scale.add_argument("--replica-gpus", type=float, default=0.0, help="GPUs reserved per replica")
    p.only_with(("--replicas", "--min-replicas", "--max-replicas"), "--ray-address", "--target-ongoing",
                "--replica-cpus", "--replica-gpus", why="they configure replicas")


def run(args: argparse.Namespace) -> None:
    import logging
    import signal

    import uvicorn

    from kataru.errors import KataruError
    from kataru.llm import DEFAULT_MODEL, load
    from kataru.serve.app import Settings, create_app

    folder = Path(args.model) if args.model else DEFAULT_MODEL
    if not folder.is_dir():
        raise KataruError(f"model folder {folder} does not exist; give the path of a local checkpoint folder")
    if args.max_num_seqs < 1 or args.max_queue < 0:
        raise KataruError("--max-num-seqs must be at least 1 and --max-queue at least 0")
    if args.kv_idle_seconds < 0 or (args.kv_idle_tokens is not None and args.kv_idle_tokens < 0):
        raise KataruError("--kv-idle-seconds and --kv-idle-tokens must be 0 or more")
    keys = [*args.api_key, *([os.environ["KATARU_API_KEY"]] if os.environ.get("KATARU_API_KEY") else [])]
    settings = Settings(served_model_name=args.served_model_name or folder.resolve().name, api_keys=keys,
                        max_queue=args.max_queue, max_body_bytes=args.max_body_bytes, log_prompts=args.log_prompts,
                        metrics_public=args.metrics_public)

    if args.replicas is not None or args.min_replicas is not None or args.max_replicas is not None:
        serve_replicas(args, folder, settings)
        return

    def load_model():  # type: ignore[no-untyped-def]
        return load(folder, progress=False, **load_options(args))

    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(message)s"))
    serve_log = logging.getLogger("kataru.serve")
    serve_log.addHandler(handler)
    serve_log.setLevel(logging.INFO)
    serve_log.info("kataru serve: %s as %r on http://%s:%d (%s); the chat page: http://%s:%d/", folder,
                   settings.served_model_name, args.host, args.port, "API key required" if keys else "no API key",
                   args.host, args.port)
    config = uvicorn.Config(create_app(load_model, settings), host=args.host, port=args.port, access_log=False,
                            log_level="warning", timeout_graceful_shutdown=args.grace, lifespan="on")
    # uvicorn shuts down gracefully on SIGTERM, then raises the signal again for the handler it found: a
    # handler that does nothing makes that a clean exit (code 0) instead of death by the signal.
    signal.signal(signal.SIGTERM, lambda signum, frame: None)
    uvicorn.Server(config).run()
    serve_log.info("kataru serve: stopped")


def load_options(args: argparse.Namespace) -> dict[str, Any]:
    """`kataru.load`'s arguments from the flags: one engine's, whether one process or each replica loads it."""
    return {"dtype": args.dtype, "device": args.device, "quantize": args.quantize, "compile": args.compile,
            "max_batch": args.max_num_seqs, "max_cache_tokens": args.kv_budget,
            "idle_cache_tokens": args.kv_idle_tokens, "idle_after": args.kv_idle_seconds,
            "batch_invariant": args.batch_invariant,
            **speculation(args)}


def serve_replicas(args: argparse.Namespace, folder: Path, settings: Any) -> None:
    """Deploy the replicas and the entry on Ray Serve, wait for SIGTERM or Ctrl-C, then take them down."""
    import dataclasses
    import signal
    import threading

    from kataru.errors import KataruError

    replicas = args.replicas if args.replicas is not None else args.min_replicas or 1
    low = args.min_replicas if args.min_replicas is not None else 1
    if replicas < 1 or low < 1 or (args.max_replicas if args.max_replicas is not None else replicas) < low:
        raise KataruError("--replicas and --min-replicas must be at least 1, and --max-replicas at least "
                          "--min-replicas")
    try:
        import ray
        from ray import serve

        from kataru.serve.cluster import APP, application
    except ImportError as err:
        raise KataruError(f"--replicas needs Ray Serve 2.60 or later ({err}): pip install 'kataru[cluster]'") from None

    started_here = args.ray_address is None
    # A local cluster: Ray's own processes listen on loopback too when the server does.
    local = {"num_cpus": max(os.cpu_count() or 1, int(replicas * args.replica_cpus) + 1),
             **({"_node_ip_address": "127.0.0.1"} if args.host in ("127.0.0.1", "localhost") else {})}
    try:
        ray.init(address=args.ray_address, include_dashboard=False, log_to_driver=False,
                 **(local if started_here else {}))
    except (ConnectionError, RuntimeError) as err:
        raise KataruError(f"cannot join the Ray cluster at {args.ray_address} ({str(err).splitlines()[0]}); check "
                          "the address, and set RAY_AUTH_MODE=token when the cluster uses token authentication "
                          "(`ray start`'s default)") from None
    serve.start(http_options={"host": args.host, "port": args.port})
    app = application(folder.resolve(), replicas=replicas, min_replicas=args.min_replicas,
                      max_replicas=args.max_replicas, target_ongoing=args.target_ongoing,
                      replica_cpus=args.replica_cpus, replica_gpus=args.replica_gpus, load_options=load_options(args),
                      settings=dataclasses.asdict(settings), grace=args.grace)
    stop = threading.Event()
    for s in (signal.SIGTERM, signal.SIGINT):
        signal.signal(s, lambda signum, frame: stop.set())
    serve.run(app, name=APP, route_prefix="/")
    print(f"kataru serve: {replicas} replicas of {folder} on http://{args.host}:{args.port} (Ray "
          f"{'local cluster' if started_here else args.ray_address})", file=sys.stderr, flush=True)
    stop.wait()
    serve.delete(APP)
    if started_here:
        serve.shutdown()
        ray.shutdown()
    print("kataru serve: stopped", file=sys.stderr, flush=True)
