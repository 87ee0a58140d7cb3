"""`kataru info`: what a checkpoint is and how kataru runs it."""

from __future__ import annotations

import argparse

from kataru import dispatch
from kataru.commands import common


def add_arguments(p: argparse.ArgumentParser) -> None:
    common.add_model(p)
    p.add_argument("--prompt-style", help="llm-jp, alpaca-ja, rinna or raw (default: from the checkpoint)")
    p.add_argument("--json", action="store_true", help="print one JSON object")


def run(args: argparse.Namespace) -> None:
    import json

    info = common.load(args).info()
    if args.json:
        print(json.dumps(info, ensure_ascii=False))
        return
    width = max(len(k) for k in info)
    for key, value in info.items():
        if key == "parameters":
            value = f"{value:,}"
        elif key == "cpu":
            value = (f"{value['model']}, {value['cores']} cores, {value['threads']} threads, torch "
                     f"{value['torch_capability']}, {' '.join(value['features']) or 'no SIMD features found'}; "
                     f"kernel builds: {dispatch.builds_text(value)}")
        elif key == "dispatch":
            runs = "; ".join(f"{r['kind']} rows {r['bucket']}: {r['runs']}" for r in value["plan"])
            value = f"{value['mode']}: {runs or 'the fixed rule'}"
        elif isinstance(value, dict):
            value = ", ".join(f"{k} {v}" for k, v in value.items())
        print(f"{key:<{width}}  {value}")
