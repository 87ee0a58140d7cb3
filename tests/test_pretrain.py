"""Pretraining: the loss falls, checkpoints are atomic, resume is exact, exports load in transformers."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from train_fixtures import TINY_ARGS

from kataru.cli import main
from kataru.errors import KataruError

ROOT = Path(__file__).resolve().parents[1]


def losses(run: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in map(json.loads, (run / "log.jsonl").read_text().splitlines())}


def pretrain_cmd(data: Path, out: Path, steps: int, *extra: str) -> list[str]:
    return [sys.executable, "-m", "kataru", "pretrain", "--data", str(data), "--out", str(out),
            "--max-steps", str(steps), "--save-every", "10", "--eval-every", "25", *TINY_ARGS, *extra]


def test_micro_pretrain_lowers_the_loss(pretrained: Path) -> None:
    curve = losses(pretrained)
    assert len(curve) == 50
    first, last = sum(curve[s] for s in range(1, 6)) / 5, sum(curve[s] for s in range(46, 51)) / 5
    assert last < first - 1.0, (first, last)
    records = [json.loads(x) for x in (pretrained / "log.jsonl").read_text().splitlines()]
    assert "val_loss" in records[24] and "val_ppl" in records[49]
    assert (pretrained / "loss.png").stat().st_size > 1000
    assert (pretrained / "checkpoints" / "latest").read_text().strip() == "step-000050"
    assert sorted(p.name for p in (pretrained / "checkpoints").glob("step-*")) == ["step-000040", "step-000050"]


def test_killed_run_resumes_exactly(prepared: dict[str, Path], pretrained: Path, tmp_path: Path) -> None:
    """SIGKILL after a checkpoint, --resume, and the losses continue as in the uninterrupted run."""
    out = tmp_path / "run"
    proc = subprocess.Popen(pretrain_cmd(prepared["tokens"], out, 50), cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    latest = out / "checkpoints" / "latest"
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if latest.is_file() and latest.read_text().strip() >= "step-000020":
            break
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    resumed_from = int(latest.read_text().strip().removeprefix("step-"))
    assert resumed_from < 50, "the run finished before it could be killed"
    done = subprocess.run(pretrain_cmd(prepared["tokens"], out, 50, "--resume"), cwd=ROOT, capture_output=True,
                          text=True)
    assert done.returncode == 0, done.stderr
    reference, resumed = losses(pretrained), losses(out)
    assert len(resumed) == 50
    for step in range(1, 51):
        assert resumed[step] == reference[step], step  # bit-identical: same data order, optimizer and RNG


def test_sigint_saves_a_checkpoint_and_says_how_to_resume(prepared: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "run"
    proc = subprocess.Popen(pretrain_cmd(prepared["tokens"], out, 100000), cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    log = out / "log.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and not log.is_file():
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 2, err
    assert "interrupted at step" in err and "--resume" in err
    step = int(err.split("interrupted at step ")[1].split(";")[0])
    assert (out / "checkpoints" / "latest").read_text().strip() == f"step-{step:06d}"


def test_interrupted_checkpoint_write_keeps_latest(prepared: dict[str, Path], tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "run"
    assert main(["pretrain", "--data", str(prepared["tokens"]), "--out", str(out), "--max-steps", "10",
                 "--save-every", "5", *TINY_ARGS]) == 0
    real_save = torch.save

    def crash(*args: object, **kwargs: object) -> None:
        real_save(*args, **kwargs)
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", crash)
    capsys.readouterr()
    assert main(["pretrain", "--data", str(prepared["tokens"]), "--out", str(out), "--max-steps", "15",
                 "--save-every", "5", "--resume", *TINY_ARGS]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("kataru: error: writing checkpoint step-000015") and "disk full" in err[-1]
    assert "the last complete checkpoint, step-000010, is intact" in err[-1]
    monkeypatch.setattr(torch, "save", real_save)
    assert (out / "checkpoints" / "latest").read_text().strip() == "step-000010"
    from kataru.llm import load

    load(out / "checkpoints" / "step-000010")  # the latest checkpoint is whole


def test_resume_with_another_config_is_refused(prepared: dict[str, Path], pretrained: Path, tmp_path: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    import shutil

    out = tmp_path / "run"
    shutil.copytree(pretrained, out)
    args = [a if a != "32" else "48" for a in TINY_ARGS]  # --dim 48 instead of 32 (and --seq-len 48)
    assert main(["pretrain", "--data", str(prepared["tokens"]), "--out", str(out), "--max-steps", "60",
                 "--resume", *args]) == 2
    err = capsys.readouterr().err.strip()
    assert "another model config" in err and "\n" not in err
    assert main(["pretrain", "--data", str(prepared["tokens"]), "--out", str(out), "--max-steps", "60",
                 *TINY_ARGS]) == 2
    assert "--resume" in capsys.readouterr().err


def test_export_loads_in_transformers_with_identical_logits(pretrained: Path) -> None:
    transformers = pytest.importorskip("transformers")
    from kataru.llm import load

    folder = pretrained / "final"
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
            "generation_config.json"} <= {p.name for p in folder.iterdir()}
    llm = load(folder)
    reference = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    ids = tokenizer("吾輩は猫である。名前はまだ無い。")["input_ids"]
    assert ids == llm.tokenizer.encode("吾輩は猫である。名前はまだ無い。", add_special_tokens=True)
    with torch.no_grad():
        expected = reference(torch.tensor([ids])).logits
    assert torch.allclose(llm.logits([ids]), expected, atol=1e-5, rtol=0)


def test_bad_training_flags_are_one_line(prepared: dict[str, Path], tmp_path: Path) -> None:
    with pytest.raises(KataruError, match="--lr must be positive"):
        main_raise(["pretrain", "--data", str(prepared["tokens"]), "--out", str(tmp_path / "x"), *TINY_ARGS,
                    "--lr", "0"])
    with pytest.raises(KataruError, match="--seq-len 512 exceeds the model context 256"):
        main_raise(["pretrain", "--data", str(prepared["tokens"]), "--out", str(tmp_path / "y"),
                    *TINY_ARGS, "--seq-len", "512"])


def main_raise(argv: list[str]) -> None:
    os.environ["KATARU_DEBUG"] = "1"
    try:
        main(argv)
    finally:
        del os.environ["KATARU_DEBUG"]
