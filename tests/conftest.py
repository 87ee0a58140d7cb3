"""Session fixtures: tiny checkpoints of every seed family (tests/helpers.py builds them) and a prepared
training corpus."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from helpers import FAMILIES, build_tokenizer, make_checkpoint

# The fixed matmul rule unless a test says otherwise: plans measured on tiny shapes would make the paths (and the
# bits) depend on timing noise. tests/test_dispatch.py runs the measured plans.
os.environ.setdefault("KATARU_DISPATCH", "kernels")


@pytest.fixture(scope="session")
def tokenizer_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, int]]:
    out = {}
    for family in FAMILIES:
        folder = tmp_path_factory.mktemp(f"tok-{family}")
        out[family] = (folder, build_tokenizer(family, folder))
    return out


@pytest.fixture(scope="session")
def checkpoints(tokenizer_dirs: dict[str, tuple[Path, int]],
                tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, torch.nn.Module]]:
    out = {}
    for family in FAMILIES:
        folder = tmp_path_factory.mktemp(f"ckpt-{family}")
        out[family] = (folder, make_checkpoint(family, tokenizer_dirs, folder))
    return out


@pytest.fixture(scope="session")
def prepared(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A synthetic Aozora corpus cleaned, with a trained tokenizer and packed token files."""
    from train_fixtures import prepare

    return prepare(tmp_path_factory.mktemp("prepared"))


@pytest.fixture(scope="session")
def pretrained(prepared: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A micro pretraining run (tiny config, 50 steps) with the `kataru pretrain` command."""
    from train_fixtures import TINY_ARGS

    from kataru.cli import main

    out = tmp_path_factory.mktemp("pretrain")
    code = main(["pretrain", "--data", str(prepared["tokens"]), "--out", str(out), "--max-steps", "50",
                 "--eval-every", "25", "--save-every", "10", *TINY_ARGS])
    assert code == 0
    return out
