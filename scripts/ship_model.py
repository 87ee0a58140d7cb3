"""Copy a finished kataru-tiny-ja run into the package and write its training summary (the README's figures).

Usage: python scripts/ship_model.py RUN_FOLDER kataru/models/kataru-tiny-ja
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path


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
               "stages": stages}
    (target / "training.json").write_text(json.dumps(summary, ensure_ascii=False, indent=2) + "\n")
    for name in ("pretrain", "sft", "dpo"):
        if (run / name / "loss.png").is_file():
            shutil.copyfile(run / name / "loss.png", Path("docs") / f"kataru-tiny-ja-{name}.png")
    print(json.dumps({k: v for k, v in summary.items() if k != "stages"}, ensure_ascii=False))


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))
