"""Copy a finished kataru-tiny-ja run into the package and write its training summary (the README's figures).

Usage: python recipes/ship_model.py RUN_FOLDER kataru/models/kataru-tiny-ja
"""

from __future__ import annotations

import json
import re
import shutil
import sys
from datetime import datetime, timedelta
from itertools import pairwise
from pathlib import Path

SAMPLE_PROMPTS = ["日本の首都はどこですか", "富士山について教えてください。"]


def stage_minutes(recipe_log: Path) -> dict[str, float]:
    """Wall-clock minutes per stage from the '== stage (HH:MM:SS)' lines the recipe writes to its log."""
    if not recipe_log.is_file():
        return {}
    marks = [(m[1], datetime.strptime(m[2], "%H:%M:%S"))
             for m in re.finditer(r"^== (\S+) \((\d\d:\d\d:\d\d)\)", recipe_log.read_text(), re.MULTILINE)]
    out = {}
    for (name, start), (_, end) in pairwise(marks):
        out[name] = ((end - start) % timedelta(days=1)).total_seconds() / 60
    return out


def samples(folder: Path) -> list[dict]:
    """What the shipped model answers, sampled with the card settings and seed 0 (the README quotes these)."""
    import kataru

    llm = kataru.load(folder, progress=False)
    return [{"prompt": p, "seed": 0, "text": llm.generate(p, seed=0)} for p in SAMPLE_PROMPTS]


def log(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines()]


def main(run: Path, target: Path) -> None:
    stages = {}
    for name in ("pretrain", "sft", "dpo"):
        records = log(run / name / "log.jsonl")
        state = json.loads(sorted((run / name / "checkpoints").glob("step-*"))[-1].joinpath("trainer_state.json")
                           .read_text())
        last_eval = [r for r in records if "val_loss" in r][-1]
        stages[name] = {
            "steps": records[-1]["step"],
            "tokens_seen": records[-1]["tokens_seen"],
            "steady_tokens_per_s": sorted(r["tokens_per_s"] for r in records)[len(records) // 2],
            "final_train_loss": records[-1]["loss"],
            "validation": {k: v for k, v in last_eval.items() if k.startswith("val_")},
            "settings": state["config"],
            "jcommonsenseqa": json.loads((run / f"jcqa-{name}.json").read_text()),
            "heldout_perplexity": json.loads((run / f"quality-{name}.json").read_text()),
        }
    pretrain = stages["pretrain"]
    stages["pretrain"]["train_minutes_estimate"] = pretrain["tokens_seen"] / pretrain["steady_tokens_per_s"] / 60
    shutil.rmtree(target, ignore_errors=True)
    target.mkdir(parents=True)
    for f in (run / "dpo" / "final").iterdir():
        shutil.copyfile(f, target / f.name)
    config = json.loads((target / "config.json").read_text())
    from kataru.config import ModelConfig

    summary = {"parameters": ModelConfig.from_hf(config).num_parameters(),
               "data": json.loads((run / "clean" / "stats.json").read_text()),
               "tokens": json.loads((run / "tokens" / "meta.json").read_text())["splits"],
               "stage_wall_minutes": stage_minutes(run / "recipe.log"),
               "stages": stages,
               "samples": samples(target)}
    (target / "training.json").write_text(json.dumps(summary, ensure_ascii=False, indent=2) + "\n")
    for name in ("pretrain", "sft", "dpo"):
        if (run / name / "loss.png").is_file():
            shutil.copyfile(run / name / "loss.png", Path("docs") / f"kataru-tiny-ja-{name}.png")
    print(json.dumps({k: v for k, v in summary.items() if k != "stages"}, ensure_ascii=False))


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))
