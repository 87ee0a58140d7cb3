"""`kataru bench`: what kataru's speed is, each question a mode with its own options: `speed` (prefill and decode
against the memory roofline and transformers), `plan` (the matmul paths), `speculate`, `serve` (a server's load)."""

from __future__ import annotations

import argparse

from kataru.commands.common import DTYPE_HELP, add_speculation
from kataru.commands.options import add_mode, add_modes

TARGET = ("a seed shape (llm-jp-3.1-1.8b, rinna-3.6b, jslm-3b-4e1t, gamma-7b, alpha-7b, tiny) with random weights, "
          "or a model folder (default: the embedded kataru-tiny-ja)")


def add_arguments(p: argparse.ArgumentParser) -> None:
    modes = add_modes(p, "mode", "MODE")
    speed = add_mode(modes, "speed", "prefill and decode speed against the memory roofline, and transformers' "
                                     "generate on the very same weights", run_speed)
    model(speed, cuda=True)
    speed.add_argument("--compare", choices=["transformers"], help="run transformers on the same weights too")
    speed.add_argument("--prompt-tokens", type=int, default=512, help="prompt length timed for prefill")
    speed.add_argument("--new-tokens", type=int, default=32, help="tokens timed for decode")
    speed.add_argument("--context", type=int, default=16, help="prompt tokens before the timed decode steps")
    speed.add_argument("--compile", action="store_true", help="also measure the torch.compile'd decode step")
    speed.add_argument("--quantize", help="also measure kataru with these, comma-separated: int8,int4")
    rounds(speed)
    report(speed, plot=True)

    plan = add_mode(modes, "plan", "the matmul path chosen for each kind of layer on this CPU, with every "
                                   "candidate's time", run_plan)
    model(plan)
    plan.add_argument("--quantize", help="the quantized layers' paths too, comma-separated: int8,int4")
    report(plan)

    spec = add_mode(modes, "speculate", "speculative decoding at batch 1 on grounded and open-ended Japanese "
                                        "prompts: tokens/s with and without, acceptance", run_speculate)
    spec.add_argument("target", nargs="?", help="a trained model folder: random weights accept nothing (default: "
                                                "the embedded kataru-tiny-ja)")
    spec.add_argument("--dtype", default="auto", help=DTYPE_HELP)
    spec.add_argument("--quantize", choices=["int8", "int4"], help="weight-only quantization after loading")
    spec.add_argument("--new-tokens", type=int, default=128, help="new tokens per answer at most")
    spec.add_argument("--limit", type=int, default=8, help="prompts per workload")
    spec.add_argument("--cost-of", metavar="SHAPE|FOLDER",
                      help="replay the answers on this model's measured step costs (e.g. llm-jp-3.1-1.8b)")
    llama(spec, "the same prompts, with and without its n-gram lookup")
    add_speculation(spec, default="ngram")
    report(spec, plot=True)

    serve = add_mode(modes, "serve", "an OpenAI-compatible server on this machine under N concurrent streams: "
                                     "tokens/s, requests/s, time to first token and between tokens", run_serve)
    serve.add_argument("--url", help="a running server on this machine, e.g. http://127.0.0.1:8000")
    serve.add_argument("--start", metavar="FOLDER", help="start `kataru serve FOLDER` here instead of giving --url")
    serve.add_argument("--api-key", help="bearer key of the server")
    serve.add_argument("--concurrency", default="8,32", help="concurrent streams, comma-separated")
    serve.add_argument("--requests", type=int, default=64, help="requests per concurrency at most")
    serve.add_argument("--seconds", type=float, default=300.0, help="seconds per concurrency at most")
    serve.add_argument("--prompt-tokens", type=int, default=128, help="prompt tokens per request")
    serve.add_argument("--output-tokens", type=int, default=128, help="new tokens per request")
    serve.add_argument("--vocab", type=int, help="token ids of the random prompts stay below this (default: the "
                                                "server's /tokenizer_info)")
    llama(serve, "the same load against it, with as many slots as streams")
    rounds(serve)
    started = serve.add_argument_group("the server --start starts")
    started.add_argument("--dtype", default="auto", help=DTYPE_HELP)
    started.add_argument("--quantize", choices=["int8", "int4"], help="weight-only quantization after loading")
    add_speculation(serve, title="the started server's speculative decoding")
    serve.only_with("--start", "--dtype", "--quantize", "--speculate", "--speculate-tokens", "--speculate-min-ngram",
                    "--speculate-max-ngram", why="they are the options of the server it starts")
    report(serve, plot=True)


def model(p: argparse.ArgumentParser, cuda: bool = False) -> None:
    p.add_argument("target", nargs="?", help=TARGET)
    p.add_argument("--dtype", default="auto", help=f"{DTYPE_HELP}; a shape is saved as its model is published")
    p.add_argument("--layers", type=int, help="a shape with fewer layers than the real one (quick runs)")
    p.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    if cuda:
        p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ... (both engines run there)")


def rounds(p: argparse.ArgumentParser) -> None:
    p.add_argument("--rounds", type=int, default=1,
                   help="measure every engine this many times, taking turns, and report medians")


def llama(p: argparse.ArgumentParser, what: str) -> None:
    p.add_argument("--llama-server", help=f"llama.cpp's llama-server binary: {what}")
    p.add_argument("--gguf", help="the GGUF model llama-server runs (the same weights)")
    p.add_argument("--threads", type=int, default=2, help="llama-server's threads")
    p.only_with("--llama-server", "--gguf", "--threads")


def report(p: argparse.ArgumentParser, plot: bool = False) -> None:
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    if plot:
        p.add_argument("--plot", help="write a PNG chart here")


def run(args: argparse.Namespace) -> None:
    args.handler(args)


def quantize_list(args: argparse.Namespace) -> list[str]:
    return [m for m in (args.quantize or "").split(",") if m]


def run_plan(args: argparse.Namespace) -> None:
    import json

    from kataru.bench import format_plan, plan_report
    from kataru.llm import DEFAULT_MODEL

    plan = plan_report(args.target or str(DEFAULT_MODEL), dtype=args.dtype, layers=args.layers,
                       quantize=quantize_list(args), threads=args.threads)
    print(json.dumps(plan) if args.json else format_plan(plan))


def run_speed(args: argparse.Namespace) -> None:
    import json

    from kataru.bench import format_table, plot, run_bench
    from kataru.llm import DEFAULT_MODEL

    report = run_bench(args.target or str(DEFAULT_MODEL), dtype=args.dtype, layers=args.layers,
                       compare=args.compare, prompt_len=args.prompt_tokens, new_tokens=args.new_tokens,
                       threads=args.threads, quantize=quantize_list(args), compile=args.compile,
                       context=args.context, device=args.device, rounds=args.rounds)
    print(json.dumps(report) if args.json else format_table(report))
    if args.plot:
        plot(report, args.plot)


def run_speculate(args: argparse.Namespace) -> None:
    import json

    from kataru.bench_speculate import format_table, plot, run

    if args.limit < 1:
        from kataru.errors import KataruError

        raise KataruError("--limit: give at least 1 prompt per workload")
    report = run(args.target, args.speculate, args.speculate_tokens, (args.speculate_min_ngram,
                 args.speculate_max_ngram), args.limit, args.new_tokens, dtype=args.dtype,
                 quantize=args.quantize, cost_of=args.cost_of, llama_server=args.llama_server, gguf=args.gguf,
                 threads=args.threads)
    print(json.dumps(report) if args.json else format_table(report))
    if args.plot:
        plot(report, args.plot)


def run_serve(args: argparse.Namespace) -> None:
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
        report = bench_serve(url, concurrency, args.requests, args.seconds, args.prompt_tokens,
                             args.output_tokens, vocab, api_key=args.api_key,
                             llama_server=Path(args.llama_server) if args.llama_server else None,
                             gguf=Path(args.gguf) if args.gguf else None, threads=args.threads,
                             rounds=args.rounds)
    finally:
        if process is not None:
            process.terminate()
            process.wait(60)
    print(json.dumps(report) if args.json else format_table(report))
    if args.plot:
        plot(report, args.plot)
