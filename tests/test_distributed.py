"""Under torchrun, DDP and FSDP: 2 processes × batch b follow 1 process × batch 2b, and resume exactly."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from serve_helpers import wait_listening
from train_fixtures import TINY_ARGS

from kataru.serve.loadgen import free_port

ROOT = Path(__file__).resolve().parents[1]


def run(prepared: dict[str, Path], out: Path, procs: int, batch: int, *extra: str) -> list[dict]:
    args = [a for a in TINY_ARGS]
    args[args.index("--batch-size") + 1] = str(batch)
    command = ["-m", "kataru", "pretrain", "--data", str(prepared["tokens"]), "--out", str(out),
               "--max-steps", "12", "--save-every", "6", "--eval-every", "6", *args, *extra]  # later flags win
    if procs > 1:
        command = ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={procs}", *command]
    done = subprocess.run([sys.executable, *command], cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"})
    assert done.returncode == 0, done.stderr[-3000:]
    return [json.loads(x) for x in (out / "log.jsonl").read_text().splitlines()]


class Node:
    """One torchrun "node" of two, on 127.0.0.1 with a c10d rendezvous."""

    def __init__(self, prepared: dict[str, Path], out: Path, port: int, steps: int, log: Path,
                 extra: tuple[str, ...] = ()) -> None:
        args = [a for a in TINY_ARGS]
        args[args.index("--batch-size") + 1] = "2"
        command = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "1",
                   "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", "kataru-test",
                   "--max-restarts", "1", "-m", "kataru", "pretrain", "--data", str(prepared["tokens"]),
                   "--out", str(out), "--max-steps", str(steps), "--save-every", "10", "--eval-every", "10",
                   *args, "--resume", "auto", *extra]
        self.log = log.open("a")
        # A node that comes back joins a new rendezvous round; torchrun's shared store forgets to publish the
        # round's master address to it unless sharing is off (docs/deployment.md says so too).
        env = {"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin", "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"}
        self.process = subprocess.Popen(command, cwd=ROOT, stdout=self.log, stderr=subprocess.STDOUT, env=env)

    def wait(self, timeout: float = 300) -> int:
        return self.process.wait(timeout)

    def kill(self) -> None:
        """The agent and its workers (which torchrun starts in sessions of their own)."""
        for pid in [self.process.pid, *descendants(self.process.pid)]:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.process.wait(30)


def descendants(pid: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def two_nodes(prepared: dict[str, Path], out: Path, steps: int, kill_after: str | None = None,
              extra: tuple[str, ...] = ()) -> None:
    """Train on two nodes; with `kill_after`, kill the second node once that checkpoint is written, then bring
    it back with the same command (as a cluster's scheduler would)."""
    port = free_port()
    logs = [out.with_name(out.name + f"-node{i}.log") for i in range(2)]
    first = Node(prepared, out, port, steps, logs[0], extra)
    wait_listening(port, first.process)  # the first node hosts the rendezvous store: the one killed below must not
    second = Node(prepared, out, port, steps, logs[1], extra)
    try:
        if kill_after is not None:
            deadline = time.monotonic() + 300
            while not (out / "checkpoints" / kill_after / "trainer_state.json").is_file():
                assert time.monotonic() < deadline and first.process.poll() is None, logs[0].read_text()[-3000:]
                time.sleep(0.02)
            second.kill()
            assert first.process.poll() is None, "the run ended before the node was killed; make it longer"
            second = Node(prepared, out, port, steps, logs[1], extra)
        assert first.wait() == 0, logs[0].read_text()[-3000:]
        assert second.wait() == 0, logs[1].read_text()[-3000:]
    finally:
        for node in (first, second):
            if node.process.poll() is None:
                node.kill()


def test_two_nodes_match_one_process_and_survive_a_lost_node(prepared: dict[str, Path], tmp_path: Path) -> None:
    from safetensors.torch import load_file

    steps = 60
    single = run(prepared, tmp_path / "one", 1, 4, "--max-steps", str(steps), "--save-every", "10",
                 "--eval-every", "10")
    two_nodes(prepared, tmp_path / "nodes", steps)
    nodes = [json.loads(x) for x in (tmp_path / "nodes" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in nodes] == list(range(1, steps + 1))
    for a, b in zip(single, nodes, strict=True):
        assert a["tokens"] == b["tokens"]
        assert b["loss"] == pytest.approx(a["loss"], abs=2e-5), a["step"]
    # A node lost after step 20's checkpoint: torchrun restarts the survivor's worker (--max-restarts 1), the
    # node comes back, both resume from step 20 and end with the uninterrupted run's exact weights.
    two_nodes(prepared, tmp_path / "lost", steps, kill_after="step-000020")
    lost = [json.loads(x) for x in (tmp_path / "lost" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lost] == list(range(1, steps + 1))
    assert [r["loss"] for r in lost] == [r["loss"] for r in nodes]
    survivor = (tmp_path / "lost-node0.log").read_text()
    # gloo reports the lost peer as "closed" or "reset", depending on which end of the socket noticed first
    assert re.search(r"Connection (closed|reset) by peer", survivor) and "failed (exitcode: 1)" in survivor
    whole, resumed = (load_file(tmp_path / name / "final" / "model.safetensors") for name in ("nodes", "lost"))
    assert whole.keys() == resumed.keys()
    assert all(torch.equal(whole[k], resumed[k]) for k in whole)
    # FSDP2 across the two nodes: the same losses as the one process
    two_nodes(prepared, tmp_path / "fsdp", steps, extra=("--fsdp",))
    sharded = [json.loads(x) for x in (tmp_path / "fsdp" / "log.jsonl").read_text().splitlines()]
    for a, b in zip(single, sharded, strict=True):
        assert b["loss"] == pytest.approx(a["loss"], abs=2e-5), a["step"]


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
