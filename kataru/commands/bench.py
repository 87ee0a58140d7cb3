"""`kataru bench`: prefill and decode speed against the memory roofline (and transformers on the same weights)."""

from __future__ import annotations

import argparse

from kataru.commands.common import DTYPE_HELP, add_speculation


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("target", nargs="?",
                   help="a seed shape (llm-jp-3.1-1.8b, rinna-3.6b, jslm-3b-4e1t, gamma-7b, alpha-7b, tiny) with "
                        "random weights, or a model folder (default: the embedded kataru-tiny-ja); `serve`: load "
                        "an OpenAI-compatible server instead (the options below)")
    p.add_argument("--dtype", default="auto", help=f"{DTYPE_HELP}; a shape is saved as its model is published")
    p.add_argument("--layers", type=int, help="fewer layers than the real shape (quick runs)")
    p.add_argument("--compare", choices=["transformers"], help="run transformers on the same weights too")
    p.add_argument("--prompt-tokens", type=int, help="prompt length (default: 512 timed for prefill; serve: 128)")
    p.add_argument("--new-tokens", type=int, help="tokens timed for decode (default 32; --speculate: 128 at most per "
                                                  "answer)")
    p.add_argument("--context", type=int, default=16, help="prompt tokens before the timed decode steps")
    p.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ... (both engines run there)")
    p.add_argument("--compile", action="store_true", help="also measure the torch.compile'd decode step")
    p.add_argument("--rounds", type=int, default=1,
                   help="measure every engine this many times, taking turns, and report medians")
    p.add_argument("--quantize", help="also measure kataru with these, comma-separated: int8,int4")
    p.add_argument("--plan", action="store_true",
                   help="print the matmul path chosen for each kind of layer on this CPU, with every candidate's "
                        "time (with --quantize: for the quantized layers too), and stop")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.add_argument("--plot", help="write a PNG chart here")
    add_speculation(p)
    spec = p.add_argument_group("kataru bench MODEL --speculate: grounded and open-ended prompts at batch 1")
    spec.add_argument("--limit", type=int, default=8, help="prompts per workload")
    spec.add_argument("--cost-of", metavar="SHAPE|FOLDER",
                      help="replay the answers on this model's measured step costs (e.g. llm-jp-3.1-1.8b)")
    serve = p.add_argument_group("kataru bench serve")
    serve.add_argument("--url", help="a running server on this machine, e.g. http://127.0.0.1:8000")
    serve.add_argument("--start", metavar="FOLDER", help="start `kataru serve FOLDER` here (with --quantize, "
                                                          "--dtype, --speculate) instead of giving --url")
    serve.add_argument("--concurrency", default="8,32", help="concurrent streams, comma-separated")
    serve.add_argument("--requests", type=int, default=64, help="requests per concurrency at most")
    serve.add_argument("--seconds", type=float, default=300.0, help="seconds per concurrency at most")
    serve.add_argument("--output-tokens", type=int, default=128, help="new tokens per request")
    serve.add_argument("--api-key", help="bearer key of the server")
    serve.add_argument("--vocab", type=int, help="token ids of the random prompts stay below this (default: the "
                                                "server's /tokenizer_info)")
    serve.add_argument("--llama-server", help="llama.cpp's llama-server binary, to run the same load against it "
                                              "(--speculate: the same prompts, with and without its n-gram lookup)")
    serve.add_argument("--gguf", help="the GGUF model llama-server runs (the same weights)")


def run(args: argparse.Namespace) -> None:
    if args.target == "serve":
        serve(args)
        return
    if args.speculate:
        speculation(args)
        return
    import json

    from kataru.bench import format_plan, format_table, plan_report, plot, run_bench
    from kataru.llm import DEFAULT_MODEL

    if args.plan:
        plan = plan_report(args.target or str(DEFAULT_MODEL), dtype=args.dtype, layers=args.layers,
                           quantize=[m for m in (args.quantize or "").split(",") if m], threads=args.threads)
        print(json.dumps(plan) if args.json else format_plan(plan))
        return

    report = run_bench(args.target or str(DEFAULT_MODEL), dtype=args.dtype, layers=args.layers,
                       compare=args.compare, prompt_len=args.prompt_tokens or 512, new_tokens=args.new_tokens or 32,
                       threads=args.threads, quantize=[m for m in (args.quantize or "").split(",") if m],
                       compile=args.compile, context=args.context, device=args.device, rounds=args.rounds)
    print(json.dumps(report) if args.json else format_table(report))
    if args.plot:
        plot(report, args.plot)


def speculation(args: argparse.Namespace) -> None:
    import json

    from kataru.bench_speculate import format_table, plot, run

    if args.limit < 1:
        from kataru.errors import KataruError

        raise KataruError("--limit: give at least 1 prompt per workload")
    report = run(args.target, args.speculate, args.speculate_tokens, (args.speculate_min_ngram,
                 args.speculate_max_ngram), args.limit, args.new_tokens or 128, dtype=args.dtype,
                 quantize=args.quantize, cost_of=args.cost_of, llama_server=args.llama_server, gguf=args.gguf,
                 threads=args.threads or 2)
    print(json.dumps(report) if args.json else format_table(report))
    if args.plot:
        plot(report, args.plot)


def serve(args: argparse.Namespace) -> None:
    import json
    import subprocess
    import sys
    from pathlib import Path

    import httpx

    from kataru.errors import KataruError
    from kataru.serve.loadgen import bench_serve, check_loopback, format_table, plot, wait_ready

    concurrency = [int(c) for c in args.concurrency.split(",") if c]
    if not concurrency or min(concurrency) < 1:
        raise KataruError("--concurrency: give positive numbers of streams, e.g. 8,32")
    if (args.url is None) == (args.start is None):
        raise KataruError("give either --url of a running server or --start FOLDER")
    process = None
    url = args.url and check_loopback(args.url)
    if args.start:
        from kataru.serve.loadgen import free_port

        url = f"http://127.0.0.1:{free_port()}"
        command = [sys.executable, "-m", "kataru", "serve", args.start, "--port", url.rsplit(":", 1)[1],
                   "--max-num-seqs", str(max(concurrency)), "--dtype", args.dtype,
                   *(["--quantize", args.quantize] if args.quantize else []),
                   *(["--speculate", args.speculate, "--speculate-tokens", str(args.speculate_tokens),
                      "--speculate-min-ngram", str(args.speculate_min_ngram), "--speculate-max-ngram",
                      str(args.speculate_max_ngram)] if args.speculate else [])]
        process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_ready(url)
        vocab = args.vocab
        if vocab is None:
            headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
            info = httpx.get(f"{url}/tokenizer_info", headers=headers, timeout=30)
            if info.status_code != 200 or "vocab_size" not in info.json():
                raise KataruError(f"{url}/tokenizer_info gives no vocab_size; pass --vocab")
            vocab = info.json()["vocab_size"]
        report = bench_serve(url, concurrency, args.requests, args.seconds, args.prompt_tokens or 128,
                             args.output_tokens, vocab, api_key=args.api_key,
                             llama_server=Path(args.llama_server) if args.llama_server else None,
                             gguf=Path(args.gguf) if args.gguf else None, threads=args.threads or 2,
                             rounds=args.rounds)
    finally:
        if process is not None:
            process.terminate()
            process.wait(60)
    print(json.dumps(report) if args.json else format_table(report))
    if args.plot:
        plot(report, args.plot)
