"""`kataru eval`: Japanese evaluation of a checkpoint."""

from __future__ import annotations

import argparse

from kataru.commands.common import DTYPE_HELP


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("task", choices=["jcommonsenseqa", "perplexity"])
    p.add_argument("model", nargs="?", help="model folder (default: the embedded kataru-tiny-ja)")
    p.add_argument("--dtype", default="auto", help=DTYPE_HELP)
    p.add_argument("--data", help="jcommonsenseqa: valid-v1.3.json (default: jglue/ in the data folder, "
                                  "$KATARU_DATA); perplexity: a UTF-8 text file (default: held-out Aozora works)")
    p.add_argument("--limit", type=int, help="jcommonsenseqa: only the first N questions")
    p.add_argument("--quantize", default="int8,int4", help="perplexity: also these quantizations, comma-separated")
    p.add_argument("--json", action="store_true", help="print the result as JSON")


def run(args: argparse.Namespace) -> None:
    import json
    from pathlib import Path

    from kataru.files import data_folder
    from kataru.llm import DEFAULT_MODEL

    folder = Path(args.model) if args.model else DEFAULT_MODEL
    if args.task == "perplexity":
        from kataru.eval.perplexity import evaluate as perplexity

        methods = tuple(m for m in args.quantize.split(",") if m)
        report = perplexity(folder, args.dtype, methods, Path(args.data) if args.data else None)
        if args.json:
            print(json.dumps(report))
            return
        print(f"perplexity of {report['target']} on {report['tokens']} held-out tokens (windows of {report['window']})")
        for row in report["rows"]:
            print(f"{row['method']:<10}{row['perplexity']:>12.3f}{100 * row['increase']:>+9.2f}%")
        return
    from kataru.eval.jcommonsenseqa import evaluate
    from kataru.llm import load

    data = (Path(args.data) if args.data else
            data_folder("jglue") / "jglue" / "jcommonsenseqa-v1.3" / "valid-v1.3.json")
    result = evaluate(load(folder, dtype=args.dtype), data, args.limit)
    print(json.dumps(result) if args.json else
          f"JCommonsenseQA: acc {result['acc']:.3f}, acc_norm {result['acc_norm']:.3f} "
          f"over {result['questions']} questions (random 0.200)")
