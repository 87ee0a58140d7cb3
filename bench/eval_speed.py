"""`kataru eval jglue` (JCommonsenseQA) against lm-evaluation-harness' transformers backend ("hf") on the same
checkpoint and the same items (kataru's contexts, the harness's jp-stable order and shots, handed to lm-eval
as a local task), one after the other in one process: wall time of each, and how many per-item predictions
agree. Each time includes loading the model; the harness's also its building the task from the JSON file.
lm-eval 0.4 tokenizes context + choice as one string and splits it, where jp-stable (and kataru) tokenize
them apart, so a prediction can differ where a choice's first token merges with the context's last.

usage: .venv/bin/python bench/eval_speed.py [FOLDER] [--limit 100] [--prompt-version 0.2.1] [--shots 3]
                                            [--batch-size 8]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import kataru
from kataru.eval import jglue
from kataru.files import data_folder
from kataru.llm import DEFAULT_MODEL


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("folder", nargs="?", default=str(DEFAULT_MODEL))
    parser.add_argument("--limit", type=int, default=100)
    parser.add_argument("--prompt-version", default="0.2.1")
    parser.add_argument("--shots", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=8)
    args = parser.parse_args()
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import lm_eval

    data = data_folder("jglue") / "jglue"
    start = time.perf_counter()  # both timings include loading the model (the harness's also its task)
    llm = kataru.load(args.folder, dtype="float32", progress=False)
    ours = jglue.evaluate(llm, "jcommonsenseqa", data, args.prompt_version, args.shots, args.limit, progress=False)
    kataru_s = time.perf_counter() - start

    with tempfile.TemporaryDirectory() as tmp:
        docs = Path(tmp) / "docs.jsonl"
        docs.write_text("".join(json.dumps({"context": i["context"], "choices": i["choices"], "gold": i["gold"]},
                                           ensure_ascii=False) + "\n" for i in ours["items"]), encoding="utf-8")
        (Path(tmp) / "jcqa_items.yaml").write_text(f"""task: jcqa_items
dataset_path: json
dataset_kwargs:
  data_files:
    test: {docs}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{context}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{gold}}}}"
target_delimiter: ""
metric_list:
  - metric: acc
""", encoding="utf-8")
        start = time.perf_counter()
        theirs = lm_eval.simple_evaluate(
            model="hf", model_args=f"pretrained={args.folder},dtype=float32,device=cpu", tasks=["jcqa_items"],
            batch_size=args.batch_size, log_samples=True,
            task_manager=lm_eval.tasks.TaskManager(include_path=tmp))
        harness_s = time.perf_counter() - start
    samples = sorted(theirs["samples"]["jcqa_items"], key=lambda s: s["doc_id"])
    predictions = [max(range(len(s["resps"])), key=lambda c: s["resps"][c][0][0]) for s in samples]
    agree = sum(p == i["prediction"] for p, i in zip(predictions, ours["items"], strict=True))
    report = {"folder": args.folder, "items": len(samples), "prompt_version": args.prompt_version,
              "shots": args.shots, "kataru_s": kataru_s, "lm_eval_hf_s": harness_s,
              "speedup": harness_s / kataru_s, "same_predictions": agree,
              "kataru_acc": ours["acc"], "lm_eval_acc": theirs["results"]["jcqa_items"]["acc,none"]}
    print(json.dumps(report))
    print(f"{len(samples)} JCommonsenseQA items ({args.shots}-shot, prompt {args.prompt_version}): kataru "
          f"{kataru_s:.1f} s, lm-eval hf {harness_s:.1f} s ({harness_s / kataru_s:.2f}x); same prediction on "
          f"{agree} of {len(samples)}; acc {ours['acc']:.3f} vs {report['lm_eval_acc']:.3f}")


if __name__ == "__main__":
    main()
