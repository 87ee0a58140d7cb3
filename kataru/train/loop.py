"""The training loop every command shares: optimizer, schedule, accumulation, DDP, checkpoints, resume.

A task (pretraining, SFT, DPO) says how to build a batch from sample indices, what the loss is, how to
evaluate, and how to save its weights. The loop owns everything else:

- which samples a step sees is a pure function of (seed, step), so a resumed run reads exactly the
  batches the uninterrupted run would have, and N processes × batch b read the same samples as one
  process × batch N·b (each rank takes its slice of the global batch);
- checkpoints hold the task's weights, the optimizer state, the torch RNG and the log so far; they are
  written to a temporary folder that is renamed into place, then `latest` is replaced atomically, so an
  interrupted write never leaves a corrupt latest checkpoint;
- under `torchrun` the model is wrapped in DistributedDataParallel (gloo on CPU, nccl on GPU) with no
  change for the user; rank 0 logs, evaluates and saves. With `--fsdp` it is sharded instead with
  torch's FSDP2 (`fully_shard` per block, then the whole model): each rank keeps a slice of the weights,
  gradients and optimizer state. Checkpoints are then gathered into the same full files (so a run may
  resume with or without --fsdp, on any number of processes), and every rank evaluates, since a
  sharded forward needs all of them.
"""

from __future__ import annotations

import copy
import json
import math
import os
import shutil
import signal
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.distributed as dist
from torch import Tensor, nn

from kataru.charts import pyplot
from kataru.errors import KataruError
from kataru.files import atomic_output, read_json, replace_dir_atomic, write_atomic

TRAIN_HELP = {
    "max_steps": "optimizer steps in all", "batch_size": "sequences per process per micro-step",
    "grad_accum": "micro-steps per optimizer step", "lr": "peak learning rate (AdamW)",
    "min_lr_ratio": "the cosine schedule ends at this fraction of lr", "warmup_steps": "linear warmup steps",
    "weight_decay": "AdamW weight decay (matrices only)", "beta1": "AdamW beta1", "beta2": "AdamW beta2",
    "grad_clip": "clip the gradient norm to this", "eval_every": "validate every N steps",
    "save_every": "checkpoint every N steps", "log_every": "log every N steps",
    "keep": "checkpoints kept on disk", "seed": "seed of the sample order and initialisation",
    "precision": "auto (bf16 autocast on a GPU that has it), fp32 or bf16",
    "compile": "torch.compile the model", "device": "auto, cpu or cuda",
    "fsdp": "under torchrun, shard weights, gradients and optimizer state (FSDP2) instead of DDP",
}


@dataclass
class TrainConfig:
    max_steps: int = 1000
    batch_size: int = 16  # per process, per micro-step
    grad_accum: int = 1
    lr: float = 1e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 100
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    eval_every: int = 100
    save_every: int = 100
    log_every: int = 10
    keep: int = 2  # checkpoints kept on disk
    seed: int = 0
    precision: str = "auto"  # auto | fp32 | bf16
    compile: bool = False
    device: str = "auto"
    fsdp: bool = False  # shard weights, gradients and optimizer state across processes (FSDP2)

    def check(self) -> None:
        for name in ("max_steps", "batch_size", "grad_accum", "eval_every", "save_every", "log_every", "keep"):
            if getattr(self, name) < 1:
                raise KataruError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        if not self.lr > 0:
            raise KataruError(f"--lr must be positive, got {self.lr}")
        if self.precision not in ("auto", "fp32", "bf16"):
            raise KataruError(f"--precision must be auto, fp32 or bf16, got {self.precision!r}")


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warmup, then cosine decay to min_lr_ratio·lr at max_steps."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps)
    floor = cfg.lr * cfg.min_lr_ratio
    return floor + (cfg.lr - floor) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


class Task(Protocol):
    num_samples: int

    def batch(self, indices: list[int], device: torch.device) -> dict[str, Tensor]: ...

    def loss(self, model: nn.Module, batch: dict[str, Tensor]) -> tuple[Tensor, dict[str, float]]: ...

    def evaluate(self, model: nn.Module, device: torch.device) -> dict[str, float]: ...

    def save(self, model: nn.Module, folder: Path) -> None: ...

    def load(self, model: nn.Module, folder: Path) -> None: ...


@dataclass
class Distributed:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0


def init_distributed(device: str) -> tuple[Distributed, torch.device]:
    """Join the torchrun process group when launched by torchrun; otherwise one process."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if world > 1 and not dist.is_initialized():
        backend = "nccl" if device == "cuda" else "gloo"
        if device == "cuda":
            torch.cuda.set_device(local_rank)
        dist.init_process_group(backend)
    rank = dist.get_rank() if dist.is_initialized() else 0
    target = torch.device(f"cuda:{local_rank}") if device == "cuda" else torch.device(device)
    return Distributed(rank, world, local_rank), target


def sample_indices(step: int, micro: int, rank: int, world: int, cfg: TrainConfig, num_samples: int,
                   cache: dict[int, Tensor]) -> list[int]:
    """The samples one rank reads in one micro-step: a slice of the step's global batch of a per-epoch shuffle."""
    global_batch = cfg.batch_size * cfg.grad_accum * world
    first = step * global_batch + (micro * world + rank) * cfg.batch_size
    out = []
    for g in range(first, first + cfg.batch_size):
        epoch, position = divmod(g, num_samples)
        if epoch not in cache:
            cache.clear()
            cache[epoch] = torch.randperm(num_samples, generator=torch.Generator().manual_seed(cfg.seed * 7919 + epoch))
        out.append(int(cache[epoch][position]))
    return out


class Trainer:
    def __init__(self, model: nn.Module, task: Task, cfg: TrainConfig, out: Path, meta: dict[str, Any],
                 progress: bool = True) -> None:
        cfg.check()
        if task.num_samples < 1:
            raise KataruError("the dataset is empty: no training samples")
        self.cfg, self.task, self.out, self.meta, self.progress = cfg, task, out, meta, progress
        self.dist, self.device = init_distributed(cfg.device)
        self.model = model.to(self.device)
        self.model.train()
        if not any(p.requires_grad for p in model.parameters()):
            raise KataruError("nothing to train: every parameter is frozen")
        self.fsdp = cfg.fsdp and self.dist.world > 1
        # What tasks save from and load into: the model itself, or under FSDP an unsharded copy on rank 0
        # that checkpoints are gathered into.
        self.plain: nn.Module | None = model
        self.wrapped: nn.Module = model
        if self.fsdp:
            from torch.distributed.fsdp import fully_shard

            self.plain = copy.deepcopy(model) if self.dist.main else None
            for block in getattr(model, "layers", []):
                fully_shard(block)
            fully_shard(model)
        elif self.dist.world > 1:
            from torch.nn.parallel import DistributedDataParallel

            ids = [self.device.index] if self.device.type == "cuda" else None
            self.wrapped = DistributedDataParallel(model, device_ids=ids)
        params = [p for p in model.parameters() if p.requires_grad]  # sharded ones under FSDP
        decay = [p for p in params if p.dim() >= 2]
        no_decay = [p for p in params if p.dim() < 2]
        self.optimizer = torch.optim.AdamW(
            [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), foreach=True)
        self.forward_model: nn.Module = self.wrapped
        if cfg.compile:
            self.forward_model = torch.compile(self.wrapped)
        self.autocast = self._autocast()
        self.step = 0
        self.history: list[dict[str, Any]] = []
        self._perm: dict[int, Tensor] = {}

    def _autocast(self):  # type: ignore[no-untyped-def]
        want = self.cfg.precision
        if want == "auto":
            want = "bf16" if self.device.type == "cuda" and torch.cuda.is_bf16_supported() else "fp32"
        if want == "bf16":
            return lambda: torch.autocast(self.device.type, dtype=torch.bfloat16)
        return nullcontext

    # --- checkpoints -----------------------------------------------------------------------------
    def finish(self) -> Path | None:
        """Copy the last checkpoint's model files to out/final (no optimizer state), atomically; the main
        process returns the folder."""
        last = self.latest()
        if not self.dist.main or last is None:
            return None
        ignore = shutil.ignore_patterns("optimizer.pt", "trainer_state.json")
        try:
            return replace_dir_atomic(self.out / "final", lambda tmp: shutil.copytree(last, tmp, ignore=ignore,
                                                                                       dirs_exist_ok=True))
        except Exception as err:
            raise KataruError(f"writing {self.out / 'final'} failed ({write_error(err, self.out)}); checkpoint "
                              f"{last.name} is complete: free space and run again with --resume") from None

    @property
    def checkpoints(self) -> Path:
        return self.out / "checkpoints"

    def latest(self) -> Path | None:
        pointer = self.checkpoints / "latest"
        if not pointer.is_file():
            return None
        folder = self.checkpoints / pointer.read_text().strip()
        if not (folder / "trainer_state.json").is_file():
            raise KataruError(f"{pointer} names {folder.name}, which is incomplete; delete the pointer to start over")
        return folder

    def _full_state(self) -> dict[str, Any]:
        """Optimizer state keyed by parameter name, whole tensors (gathered from every rank under FSDP)."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        return get_optimizer_state_dict(self.model, self.optimizer,
                                        options=StateDictOptions(full_state_dict=True, cpu_offload=True))

    def save(self) -> Path | None:
        optimizer = self._full_state()
        if self.fsdp:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

            weights = get_model_state_dict(self.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
            if self.plain is not None:
                self.plain.load_state_dict(weights)
        if self.dist.main:
            assert self.plain is not None
            name = f"step-{self.step:06d}"
            plain = self.plain
            state = {"step": self.step, "history": self.history, "meta": self.meta, "config": asdict(self.cfg)}

            def fill(tmp: Path) -> None:
                self.task.save(plain, tmp)
                torch.save({"optimizer": optimizer, "torch_rng": torch.get_rng_state()}, tmp / "optimizer.pt")
                write_atomic(tmp / "trainer_state.json", json.dumps(state, ensure_ascii=False) + "\n")

            try:
                self.checkpoints.mkdir(parents=True, exist_ok=True)
                replace_dir_atomic(self.checkpoints / name, fill)
                write_atomic(self.checkpoints / "latest", name + "\n")
            except Exception as err:  # a full disk, a folder gone read-only: no half checkpoint is left behind
                latest = self.latest()
                kept = f"the last complete checkpoint, {latest.name}, is intact" if latest else "no checkpoint was kept"
                why = write_error(err, self.out)
                raise KataruError(f"writing checkpoint {name} in {self.checkpoints} failed ({why}); {kept}: free "
                                  "space and run again with --resume") from None
            kept = sorted(p for p in self.checkpoints.glob("step-*") if p.is_dir())
            for old in kept[:-self.cfg.keep]:
                shutil.rmtree(old, ignore_errors=True)
            try:
                self._write_log()
            except Exception as err:
                raise KataruError(f"writing {self.out / 'log.jsonl'} failed ({write_error(err, self.out)}); checkpoint "
                                  f"{name} is complete: free space and run again with --resume") from None
        if self.dist.world > 1:
            dist.barrier()
        return self.checkpoints / f"step-{self.step:06d}"

    def resume(self, folder: Path | None = None) -> None:
        folder = folder or self.latest()
        if folder is None:
            raise KataruError(f"--resume: no checkpoint in {self.checkpoints}; start without --resume")
        state = read_json(folder / "trainer_state.json", "the checkpoint is damaged; resume from an earlier one")
        if state.get("meta", {}).get("model") != self.meta.get("model"):
            raise KataruError(f"checkpoint {folder} was trained with another model config; "
                              "resume with the same settings or start a new --out folder")
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            set_model_state_dict,
            set_optimizer_state_dict,
        )

        saved = torch.load(folder / "optimizer.pt", map_location="cpu", weights_only=True)
        if self.fsdp:
            # Rank 0 reads the files into its unsharded copy; FSDP scatters the slices to every rank.
            full = {}
            if self.plain is not None:
                self.task.load(self.plain, folder)
                full = self.plain.state_dict()
            options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True)
            set_model_state_dict(self.model, full, options=options)
        else:
            self.task.load(self.model, folder)
            options = StateDictOptions(full_state_dict=True)
        if all(isinstance(k, int) for k in saved["optimizer"].get("state", {})) and not self.fsdp:
            self.optimizer.load_state_dict(saved["optimizer"])  # written by kataru before 0.1's FSDP (by index)
        else:
            set_optimizer_state_dict(self.model, self.optimizer, saved["optimizer"], options=options)
        torch.set_rng_state(saved["torch_rng"].cpu())
        self.step, self.history = int(state["step"]), list(state["history"])

    def _write_log(self) -> None:
        lines = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in self.history)
        write_atomic(self.out / "log.jsonl", lines)
        plot_history(self.history, self.out / "loss.png", title=self.meta.get("name", "training"))

    # --- the loop --------------------------------------------------------------------------------
    def _reduce(self, value: float) -> float:
        if self.dist.world == 1:
            return value
        t = torch.tensor([value], dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return float(t.item()) / self.dist.world

    def train_step(self) -> dict[str, Any]:
        cfg = self.cfg
        lr = lr_at(self.step, cfg)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        total, metrics_sum, tokens = 0.0, {}, 0
        for micro in range(cfg.grad_accum):
            indices = sample_indices(self.step, micro, self.dist.rank, self.dist.world, cfg,
                                     self.task.num_samples, self._perm)
            batch = self.task.batch(indices, self.device)
            tokens += int(batch["tokens"].item()) if "tokens" in batch else 0
            last = micro == cfg.grad_accum - 1
            if self.fsdp:
                self.model.set_requires_gradient_sync(last)  # type: ignore[operator]
                sync = nullcontext()
            else:
                sync = nullcontext() if last or self.dist.world == 1 else self.wrapped.no_sync()  # type: ignore[operator]
            with sync:
                with self.autocast():
                    loss, metrics = self.task.loss(self.forward_model, batch)
                (loss / cfg.grad_accum).backward()
            total += float(loss.detach()) / cfg.grad_accum
            for k, v in metrics.items():
                metrics_sum[k] = metrics_sum.get(k, 0.0) + v / cfg.grad_accum
        params = [p for g in self.optimizer.param_groups for p in g["params"]]
        norm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        grad_norm = float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        record = {"step": self.step, "loss": self._reduce(total), "lr": lr, "grad_norm": grad_norm,
                  "tokens": tokens * self.dist.world}
        record.update({k: self._reduce(v) for k, v in metrics_sum.items()})
        return record

    def _stop_everywhere(self) -> bool:
        """Whether any rank was asked to stop (all ranks stop at the same step)."""
        if self.dist.world == 1:
            return self.stop_requested
        flag = torch.tensor([float(self.stop_requested)], device=self.device)
        dist.all_reduce(flag)
        return bool(flag.item())

    def evaluate(self) -> dict[str, float]:
        result: dict[str, float] = {}
        if self.dist.main or self.fsdp:
            self.model.eval()
            with torch.no_grad(), self.autocast():
                result = self.task.evaluate(self.model, self.device)
            self.model.train()
            if self.fsdp:  # a forward without backward leaves the root's weights gathered
                self.model.reshard()  # type: ignore[operator]
        if self.dist.world > 1:
            dist.barrier()
        return result

    def run(self) -> list[dict[str, Any]]:
        from tqdm import tqdm

        cfg = self.cfg
        seen = sum(r.get("tokens", 0) for r in self.history if "loss" in r)
        bar = tqdm(total=cfg.max_steps, initial=self.step, desc=self.meta.get("name", "train"), unit="step",
                   disable=not (self.progress and self.dist.main), dynamic_ncols=True)
        # Ctrl-C / SIGTERM stop the run at the next step boundary (never inside a save); a second one forces.
        self.stop_requested = False

        def request_stop(signum: int, frame: Any) -> None:
            if self.stop_requested:
                raise KeyboardInterrupt
            self.stop_requested = True

        previous = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
        if self.dist.main:
            for s in previous:
                signal.signal(s, request_stop)
        started, window_tokens = time.perf_counter(), 0
        try:
            while self.step < cfg.max_steps and not self._stop_everywhere():
                record = self.train_step()
                seen += record["tokens"]
                window_tokens += record["tokens"]
                record["tokens_seen"] = seen
                elapsed = time.perf_counter() - started
                record["tokens_per_s"] = window_tokens / elapsed if elapsed > 0 else 0.0
                if self.step % cfg.eval_every == 0 or self.step == cfg.max_steps:
                    record.update(self.evaluate())
                self.history.append(record)
                bar.update(1)
                bar.set_postfix({k: f"{record[k]:.3g}" for k in ("loss", "val_loss", "tokens_per_s") if k in record})
                if self.step % cfg.save_every == 0 or self.step == cfg.max_steps:
                    self.save()
        finally:
            bar.close()
            if self.dist.main:
                for s, handler in previous.items():
                    signal.signal(s, handler)
        if self.step < cfg.max_steps:
            folder = self.save()
            raise KataruError(f"interrupted at step {self.step}; saved {folder}, continue with --resume")
        return self.history


def write_error(err: BaseException, folder: Path) -> str:
    """Why a write failed, in a few words: the OS's reason, or (torch.save reports a full disk as a RuntimeError
    about file positions) that the disk is full."""
    if isinstance(err, OSError) and err.strerror:
        return err.strerror
    try:
        if shutil.disk_usage(folder).free < 1 << 20:
            return "No space left on device"
    except OSError:
        pass
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0][:160] if text else ''}"


def plot_history(history: list[dict[str, Any]], path: Path, title: str) -> None:
    """Training and validation loss against tokens seen (skipped when matplotlib is not installed)."""
    try:
        plt = pyplot()
    except KataruError:
        return
    train = [(r.get("tokens_seen", r["step"]), r["loss"]) for r in history if "loss" in r]
    val = [(r.get("tokens_seen", r["step"]), r["val_loss"]) for r in history if "val_loss" in r]
    if not train:
        return
    fig, ax = plt.subplots(figsize=(6.4, 4))
    ax.plot(*zip(*train, strict=False), label="train loss", linewidth=0.8)
    if val:
        ax.plot(*zip(*val, strict=False), "o-", label="validation loss")
    ax.set_xlabel("tokens seen" if "tokens_seen" in history[0] else "step")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    with atomic_output(path, "wb") as f:
        fig.savefig(f, dpi=110, format="png")
    plt.close(fig)
