"""Under torchrun, DDP and FSDP: 2 processes × batch b follow 1 process × batch 2b, and resume exactly."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from train_fixtures import TINY_ARGS

ROOT = Path(__file__).resolve().parents[1]


def run(prepared: dict[str, Path], out: Path, procs: int, batch: int, *extra: str) -> list[dict]:
    args = [a for a in TINY_ARGS]
    args[args.index("--batch-size") + 1] = str(batch)
    command = ["-m", "kataru", "pretrain", "--data", str(prepared["tokens"]), "--out", str(out),
               "--max-steps", "12", "--save-every", "6", "--eval-every", "6", *args, *extra]
    if procs > 1:
        command = ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={procs}", *command]
    done = subprocess.run([sys.executable, *command], cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"})
    assert done.returncode == 0, done.stderr[-3000:]
    return [json.loads(x) for x in (out / "log.jsonl").read_text().splitlines()]


def test_two_processes_match_one_process_with_double_batch(prepared: dict[str, Path], tmp_path: Path) -> None:
    single = run(prepared, tmp_path / "one", procs=1, batch=4)
    double = run(prepared, tmp_path / "two", procs=2, batch=2)
    assert len(single) == len(double) == 12
    for a, b in zip(single, double, strict=True):
        assert a["tokens"] == b["tokens"]
        assert b["loss"] == pytest.approx(a["loss"], abs=2e-5), a["step"]
    assert double[-1]["val_loss"] == pytest.approx(single[-1]["val_loss"], abs=1e-4)
    assert (tmp_path / "two" / "final" / "model.safetensors").is_file()


def test_fsdp_matches_one_process_and_resumes_exactly(prepared: dict[str, Path], tmp_path: Path) -> None:
    single = run(prepared, tmp_path / "one", procs=1, batch=4)
    sharded = run(prepared, tmp_path / "fsdp", 2, 2, "--fsdp")
    for a, b in zip(single, sharded, strict=True):
        assert b["loss"] == pytest.approx(a["loss"], abs=2e-5), a["step"]
    assert sharded[-1]["val_loss"] == pytest.approx(single[-1]["val_loss"], abs=1e-4)
    # Checkpoints are whole files: go back to step 6 and resume, sharded again and in one process.
    checkpoints = tmp_path / "fsdp" / "checkpoints"
    for resumed_with in (("--fsdp",), ()):
        shutil.rmtree(checkpoints / "step-000012", ignore_errors=True)
        (checkpoints / "latest").write_text("step-000006\n")
        procs, batch = (2, 2) if resumed_with else (1, 4)
        again = run(prepared, tmp_path / "fsdp", procs, batch, "--resume", *resumed_with)
        assert [r["step"] for r in again] == list(range(1, 13))
        for a, b in zip(sharded[6:], again[6:], strict=True):
            if resumed_with:
                assert b["loss"] == a["loss"], a["step"]  # same processes, same order: bit-identical
            else:
                assert b["loss"] == pytest.approx(a["loss"], abs=2e-5), a["step"]
