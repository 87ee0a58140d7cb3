"""`kataru serve`: the OpenAI API (chat, completions, tokenize, models, health, metrics) on one engine."""

from __future__ import annotations

import argparse

from kataru.commands.common import DTYPE_HELP

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
    p.add_argument("--max-body-bytes", type=int, default=4 << 20, help="larger request bodies get 413")
    p.add_argument("--grace", type=float, default=30.0, help="seconds in-flight requests get after SIGTERM")
    p.add_argument("--log-prompts", action="store_true", help="write prompts into the access log")
    p.add_argument("--metrics-public", action="store_true", help="serve /metrics without the API key")


def run(args: argparse.Namespace) -> None:
    import logging
    import os
    import signal
    import sys
    from pathlib import Path

    import uvicorn

    from kataru.errors import KataruError
    from kataru.llm import DEFAULT_MODEL, load
    from kataru.serve.app import Settings, create_app

    folder = Path(args.model) if args.model else DEFAULT_MODEL
    if not folder.is_dir():
        raise KataruError(f"model folder {folder} does not exist; give the path of a local checkpoint folder")
    if args.max_num_seqs < 1 or args.max_queue < 0:
        raise KataruError("--max-num-seqs must be at least 1 and --max-queue at least 0")
    keys = [*args.api_key, *([os.environ["KATARU_API_KEY"]] if os.environ.get("KATARU_API_KEY") else [])]
    settings = Settings(served_model_name=args.served_model_name or folder.resolve().name, api_keys=keys,
                        max_queue=args.max_queue, max_body_bytes=args.max_body_bytes, log_prompts=args.log_prompts,
                        metrics_public=args.metrics_public)

    def load_model():  # type: ignore[no-untyped-def]
        return load(folder, dtype=args.dtype, device=args.device, quantize=args.quantize, compile=args.compile,
                    max_batch=args.max_num_seqs, max_cache_tokens=args.kv_budget,
                    idle_cache_tokens=args.kv_budget or 1 << 40, progress=False, batch_invariant=args.batch_invariant)

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
