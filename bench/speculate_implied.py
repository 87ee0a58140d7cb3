"""What the acceptance a trained model shows implies on the full llm-jp-3.1-1.8b shape, for kataru and for
llama.cpp, from one `kataru bench speculate --cost-of llm-jp-3.1-1.8b --json` report and one
`llama-bench -p 1,2,...` run on the shape's GGUF (bench/speculate_llamacpp.sh makes both).

Both replay the same greedy answers (llama.cpp's greedy tokens are kataru's: the same weights and token ids):
kataru with its adaptive prompt lookup priced by its own measured verification costs, llama.cpp with its
`ngram-simple` lookup (the last n tokens looked up, the next m proposed whenever they match; n and m as the
bench ran llama-server) priced by llama-bench's time for a batch of n tokens.

usage: .venv/bin/python bench/speculate_implied.py REPORT.json LLAMA_BENCH.json [--plot PNG]
"""

from __future__ import annotations

import argparse
import json

from kataru.bench_speculate import replay
from kataru.engine.speculate import Options, StepCost


def llama_cost(path: str) -> StepCost:
    """llama-bench's pp-n rows as the seconds to verify n tokens of one sequence, each at its fastest repetition
    (kataru's calibration takes the best of two as well; llama-bench's first pp1 repetition is a cold start);
    one token from its tg run, decode steps as plain decoding makes them."""
    rows = json.loads(open(path).read())
    base = {}
    for row in rows:
        n, fastest = row["n_prompt"] or 0, max(row["samples_ts"])
        if n and not row["n_gen"]:
            base[n] = n / fastest
    for row in rows:
        if row["n_gen"] and not row["n_prompt"]:
            base[1] = 1 / max(row["samples_ts"])
    return StepCost(base, 0.0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("report")
    parser.add_argument("llama_bench")
    parser.add_argument("--plot")
    args = parser.parse_args()
    report = json.loads(open(args.report).read())
    ours = StepCost({int(n): t / 1e3 for n, t in report["replay"]["cost"]["ms"].items()},
                    report["replay"]["cost"]["context_us_per_token"] / 1e6)
    theirs = llama_cost(args.llama_bench)
    k, (low, high) = report["speculate_tokens"], report["ngram"]
    n = low + 1  # as `kataru bench` started llama-server: --spec-ngram-simple-size-n
    print(f"implied on {report['replay']['cost']['target']} (batch 1, greedy; answers of {report['model']})")
    print(f"{'workload':<12} {'engine':<34} {'tok/s':>7} {'speed-up':>9} {'accepted':>9}")
    rows = {}
    for name, result in report["kataru"].items():
        answers = result["answers"]
        runs = {"kataru plain": replay(answers, ours, Options("ngram", k, low, high), None),
                "kataru ngram (adaptive)": replay(answers, ours, Options("ngram", k, low, high), True),
                "llama.cpp plain": replay(answers, theirs, Options("ngram", k, n, n), None),
                f"llama.cpp ngram-simple (n={n}, m={k})": replay(answers, theirs, Options("ngram", k, n, n), False)}
        rows[name] = runs
        for engine, r in runs.items():
            base = runs["kataru plain" if engine.startswith("kataru") else "llama.cpp plain"]["tok_s"]
            rate = "" if r["acceptance_rate"] is None else f"{100 * r['acceptance_rate']:.0f}%"
            print(f"{name:<12} {engine:<34} {r['tok_s']:>7.1f} {r['tok_s'] / base:>8.2f}x {rate:>9}")
        ratio = runs["kataru ngram (adaptive)"]["tok_s"] / runs[f"llama.cpp ngram-simple (n={n}, m={k})"]["tok_s"]
        print(f"{'':<12} kataru's speculation against llama.cpp's: {ratio:.2f}x")
    if args.plot:
        from kataru.charts import pyplot

        plt = pyplot()
        fig, ax = plt.subplots(figsize=(8, 4))
        names = list(rows)
        engines = list(rows[names[0]])
        width = 0.8 / len(engines)
        for i, engine in enumerate(engines):
            ax.bar([x + i * width for x in range(len(names))], [rows[w][engine]["tok_s"] for w in names], width,
                   label=engine)
        ax.set_xticks([x + 0.4 - width / 2 for x in range(len(names))], names)
        ax.set_ylabel("implied tokens/s (batch 1)")
        ax.set_title(f"speculation on {report['replay']['cost']['target']}, {report['date']}")
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(args.plot, dpi=120)


if __name__ == "__main__":
    main()
