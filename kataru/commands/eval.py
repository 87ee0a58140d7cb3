"""`kataru eval`: Japanese evaluation of a checkpoint."""

from __future__ import annotations

import argparse
from typing import Any

from kataru.commands.common import DTYPE_HELP
from kataru.commands.options import add_mode, add_modes


def add_arguments(p: argparse.ArgumentParser) -> None:
    modes = add_modes(p, "evaluation", "EVALUATION")
    jglue = add_mode(modes, "jglue", "JCommonsenseQA, JNLI and JSQuAD as the jp-stable harness runs them "
                                     "(its prompts, shots and metrics)", run_jglue)
    common(jglue)
    jglue.add_argument("--tasks", default="jcommonsenseqa,jnli,jsquad",
                       help="comma-separated: jcommonsenseqa, jnli (1.3), jnli-1.1 (the published tables'), jsquad")
    jglue.add_argument("--prompt-version", default="auto",
                       help="auto (the card's format: rinna 0.4, JSLM instruct 0.3, base 0.2) or a version")
    jglue.add_argument("--fewshot", help="shots per task, comma-separated (default: the ja8 suite's: 3, 3, 2)")
    jglue.add_argument("--limit", type=int, help="only the first N documents of each task")
    jglue.add_argument("--data", help="the JGLUE datasets folder (default: jglue/ in the data folder, $KATARU_DATA)")
    jglue.add_argument("--output", help="write the results, with every item's context, scores and prediction, "
                                        "to this JSON file")
    jglue.add_argument("--plot", help="the scores as bars (PNG)")

    jcqa = add_mode(modes, "jcommonsenseqa", "JCommonsenseQA by log-likelihood: the highest of five answers after "
                                             "the question wins (acc, and acc_norm per character)", run_jcommonsenseqa)
    common(jcqa)
    jcqa.add_argument("--data", help="valid-v1.3.json (default: jglue/ in the data folder, $KATARU_DATA)")
    jcqa.add_argument("--limit", type=int, help="only the first N questions")

    perplexity = add_mode(modes, "perplexity", "perplexity on held-out text, in the checkpoint's dtype and after "
                                               "each quantization", run_perplexity)
    common(perplexity)
    perplexity.add_argument("--data", help="a UTF-8 text file (default: the held-out Aozora works)")
    perplexity.add_argument("--quantize", default="int8,int4", help="also these quantizations, comma-separated "
                                                                    "(empty: none)")

    harness = add_mode(modes, "lm-eval", "any lm-evaluation-harness task on kataru (pip install lm-eval)", run_harness)
    common(harness)
    harness.add_argument("--tasks", required=True, help="harness task names, comma-separated")
    harness.add_argument("--include-path", help="a folder of task YAML files (local tasks, offline)")
    harness.add_argument("--num-fewshot", type=int, help="few-shot examples per task (default: the task's)")
    harness.add_argument("--batch-size", type=int, default=8, help="requests scored or generated together")
    harness.add_argument("--limit", type=int, help="only the first N documents of each task")

    mt = add_mode(modes, "mt-bench", "Japanese MT-Bench as llm-jp-judge runs it: both turns answered in the "
                                     "checkpoint's prompt format, graded by an OpenAI-compatible judge", run_mt_bench)
    common(mt)
    mt.add_argument("--judge-url", help="an OpenAI-compatible endpoint, e.g. https://api.openai.com/v1 or a "
                                        "`kataru serve` at http://127.0.0.1:8000/v1")
    mt.add_argument("--judge-model", help="the judge's model name at that endpoint")
    mt.add_argument("--judge-key-env", help="the environment variable holding the judge's API key")
    mt.add_argument("--judge-max-tokens", type=int, default=2048, help="the judge's max_tokens (llm-jp-judge: 2048)")
    mt.add_argument("--lang", choices=["ja", "en"], default="ja", help="the question set")
    mt.add_argument("--workers", type=int, default=8, help="questions answered (and judged) at a time")
    mt.add_argument("--rounds", type=int, default=1,
                    help="answer and judge this many times (seeds 0, 1, ...) and average (llm-jp's card: 3)")
    mt.add_argument("--limit", type=int, help="only the first N questions")
    mt.add_argument("--data", help="llm-jp-judge's folder of questions, references and judge prompts (default: "
                                   "mt-bench-ja-llmjp/ in the data folder); with --replay: FastChat's question.jsonl")
    mt.add_argument("--output", help="folder for answers.jsonl, judgments.jsonl and results.json (a run there "
                                     "resumes; default: mt-bench-<model folder name>)")
    mt.add_argument("--replay", help="score judgments already made (FastChat's gpt-4_single.jsonl), no judge")
    mt.add_argument("--plot", help="the categories as a radar chart (PNG)")
    mt.never_with("--replay", "model", "--dtype", "--judge-url", "--judge-model", "--judge-key-env",
                  "--judge-max-tokens", "--lang", "--workers", "--rounds", "--limit", "--output",
                  why="a replay scores judgments already made")


def common(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", nargs="?", help="model folder (default: the embedded kataru-tiny-ja)")
    p.add_argument("--dtype", default="auto", help=DTYPE_HELP)
    p.add_argument("--json", action="store_true", help="print the result as JSON")


def run(args: argparse.Namespace) -> None:
    args.handler(args)


def folder_of(args: argparse.Namespace) -> Any:
    from pathlib import Path

    from kataru.llm import DEFAULT_MODEL

    return Path(args.model) if args.model else DEFAULT_MODEL


def run_perplexity(args: argparse.Namespace) -> None:
    import json
    from pathlib import Path

    from kataru.eval.perplexity import evaluate as perplexity

    methods = tuple(m for m in args.quantize.split(",") if m)
    report = perplexity(folder_of(args), args.dtype, methods, Path(args.data) if args.data else None)
    if args.json:
        print(json.dumps(report))
        return
    print(f"perplexity of {report['target']} on {report['tokens']} held-out tokens (windows of {report['window']})")
    for row in report["rows"]:
        print(f"{row['method']:<10}{row['perplexity']:>12.3f}{100 * row['increase']:>+9.2f}%")


def run_jcommonsenseqa(args: argparse.Namespace) -> None:
    import json
    from pathlib import Path

    from kataru.eval.jcommonsenseqa import evaluate
    from kataru.files import data_folder
    from kataru.llm import load

    data = (Path(args.data) if args.data else
            data_folder("jglue") / "jglue" / "jcommonsenseqa-v1.3" / "valid-v1.3.json")
    result = evaluate(load(folder_of(args), dtype=args.dtype), data, args.limit)
    print(json.dumps(result) if args.json else
          f"JCommonsenseQA: acc {result['acc']:.3f}, acc_norm {result['acc_norm']:.3f} "
          f"over {result['questions']} questions (random 0.200)")


def run_mt_bench(args: argparse.Namespace) -> None:
    import json
    import os
    from pathlib import Path

    from tqdm import tqdm

    from kataru.errors import KataruError
    from kataru.eval import mtbench
    from kataru.files import data_folder, write_atomic

    if args.replay:
        questions = Path(args.data) if args.data else data_folder("mt-bench-ja") / "mt-bench-ja" / "question.jsonl"
        results = mtbench.replay(Path(args.replay), questions if questions.is_file() else None)
        print(json.dumps(results, ensure_ascii=False) if args.json else mtbench.table(results))
        if args.plot:
            mtbench.radar(results, Path(args.plot))
        return
    if not (args.judge_url and args.judge_model):
        raise KataruError("mt-bench needs a judge: --judge-url URL --judge-model NAME (or --replay FILE)")
    key = None
    if args.judge_key_env:
        key = os.environ.get(args.judge_key_env)
        if not key:
            raise KataruError(f"--judge-key-env {args.judge_key_env}: that environment variable is not set")
    from kataru.llm import load

    folder = folder_of(args)
    data = Path(args.data) if args.data else data_folder("mt-bench-ja-llmjp") / "mt-bench-ja-llmjp"
    bench = mtbench.load_bench(data, args.lang, args.limit)
    out = Path(args.output or f"mt-bench-{folder.name}")
    out.mkdir(parents=True, exist_ok=True)
    llm = load(folder, dtype=args.dtype, max_batch=max(1, args.workers))

    judge = mtbench.Judge(args.judge_url, args.judge_model, key, max_tokens=args.judge_max_tokens)
    asked = {q["question_id"] for q in bench.questions}
    rows, scores = [], []
    for round_ in range(1, args.rounds + 1):  # rounds answer anew (seed = round - 1) and are judged anew
        where = out if args.rounds == 1 else out / f"round-{round_}"
        where.mkdir(parents=True, exist_ok=True)

        def generate(history: list[dict[str, str]], temperature: float, seed: int = round_ - 1) -> str:
            # up to 1024 new tokens, fewer where the dialogue leaves less of the context (none when it is full)
            room = llm.config.max_seq_len - len(llm.encode_prompt(history, system=mtbench.SYSTEM))
            if room < 1:
                return ""
            return llm.generate(history, system=mtbench.SYSTEM, temperature=temperature,
                                max_new_tokens=min(mtbench.MAX_NEW_TOKENS, room), seed=seed)

        label = "" if args.rounds == 1 else f" (round {round_})"
        with tqdm(total=len(bench.questions), desc="answers" + label, unit="q") as bar:
            answers = mtbench.answer_all(generate, bench, mtbench.Log(where / "answers.jsonl"), args.workers, bar)
        judgments = mtbench.Log(where / "judgments.jsonl")
        with tqdm(total=sum(len(q["turns"]) for q in bench.questions), desc="judged" + label, unit="turn") as bar:
            mtbench.judge_all(judge, bench, answers, judgments, min(args.workers, 4), bar)
        done = [r for r in judgments.rows if r["question_id"] in asked]
        rows += done
        scores.append(mtbench.summarize(done)["score"])
    results = {folder.name: mtbench.summarize(rows)}  # over every round's judgments: the mean of the rounds
    results[folder.name].update(judge=args.judge_model, judge_url=args.judge_url, lang=args.lang,
                                questions=len(bench.questions), rounds=scores)
    write_atomic(out / "results.json", json.dumps(results, ensure_ascii=False, indent=1) + "\n")
    if args.plot:
        mtbench.radar(results, Path(args.plot))
    print(json.dumps(results, ensure_ascii=False) if args.json else mtbench.table(results))


def run_harness(args: argparse.Namespace) -> None:
    import json

    from kataru.errors import KataruError

    try:
        import lm_eval
        from lm_eval.utils import make_table
    except ImportError:
        raise KataruError("lm-eval is not installed: pip install 'lm-eval==0.4.13'") from None
    from kataru.eval.harness import KataruLM

    manager = lm_eval.tasks.TaskManager(include_path=args.include_path) if args.include_path else None
    results = lm_eval.simple_evaluate(
        model=KataruLM(str(folder_of(args)), dtype=args.dtype, batch_size=args.batch_size), tasks=args.tasks.split(","),
        num_fewshot=args.num_fewshot, limit=args.limit, task_manager=manager)
    if args.json:
        print(json.dumps({"results": results["results"], "versions": results.get("versions"),
                          "n-shot": results.get("n-shot")}, ensure_ascii=False, default=str))
    else:
        print(make_table(results))


def run_jglue(args: argparse.Namespace) -> None:
    import hashlib
    import json
    from pathlib import Path

    import kataru
    from kataru.errors import KataruError
    from kataru.eval import jglue as tasks
    from kataru.files import data_folder, write_atomic
    from kataru.llm import load

    names = [t for t in args.tasks.split(",") if t]
    unknown = [t for t in names if t not in tasks.TASKS]
    if unknown:
        raise KataruError(f"unknown JGLUE task {unknown[0]!r}; use {', '.join(tasks.TASKS)}")
    shots = [int(n) for n in args.fewshot.split(",")] if args.fewshot else [tasks.TASKS[t][2] for t in names]
    if len(shots) != len(names):
        raise KataruError(f"--fewshot gives {len(shots)} counts for {len(names)} tasks")
    folder = folder_of(args)
    data = Path(args.data) if args.data else data_folder("jglue") / "jglue"
    llm = load(folder, dtype=args.dtype)
    weights = sorted(Path(folder).glob("*.safetensors")) or sorted(Path(folder).glob("*.bin"))
    digest = hashlib.sha256()  # a fingerprint: each weight file's name, size, first and last MiB
    for w in weights:
        with w.open("rb") as f:
            digest.update(w.name.encode() + str(w.stat().st_size).encode() + f.read(1 << 20))
            f.seek(max(0, w.stat().st_size - (1 << 20)))
            digest.update(f.read())
    report = {"model": str(folder), "checkpoint": digest.hexdigest()[:16], "kataru": kataru.__version__,
              "harness": "jp-stable (Stability-AI/lm-evaluation-harness)", "results": []}
    for name, k in zip(names, shots, strict=True):
        report["results"].append(tasks.evaluate(llm, name, data, args.prompt_version, k, args.limit))
    if args.output:
        write_atomic(Path(args.output), json.dumps(report, ensure_ascii=False, indent=1) + "\n")
    if args.plot:
        tasks.plot(report["results"], Path(args.plot), f"JGLUE: {Path(folder).name}")
    if args.json:
        print(json.dumps(report, ensure_ascii=False))
        return
    print("| task | version | prompt | shots | docs | score |\n|---|---|---|---|---|---|")
    for r in report["results"]:
        score = (f"EM {r['exact_match']:.2f} (F1 {r['f1']:.2f})" if "f1" in r else
                 f"acc {100 * r['acc']:.2f} (acc_norm {100 * r['acc_norm']:.2f})")
        print(f"| {r['task']} | {r['task_version']} | {r['prompt_version']} | {r['shots']} ({r['shots_from']}) | "
              f"{r['documents']} | {score} |")
