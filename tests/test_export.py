"""Export is the weight plan read backwards: every family the loader reads is written back as a Hugging Face
folder that transformers loads (Alpha, whose code is remote upstream: that kataru reloads) with the logits
kataru computes."""

from __future__ import annotations

from itertools import pairwise
from pathlib import Path

import pytest
import torch
from helpers import FAMILIES
from safetensors.torch import load_file

import kataru
from kataru.checkpoint import source_rows, weight_plan
from kataru.config import read_config_file
from kataru.errors import KataruError
from kataru.train.export import hf_state_dict, save_hf


@pytest.mark.parametrize("family", FAMILIES)
def test_export_round_trip_keeps_the_logits(family: str, checkpoints: dict, tmp_path: Path) -> None:
    folder = checkpoints[family][0]
    llm = kataru.load(folder, dtype="float32")
    exported = save_hf(llm.model, read_config_file(folder), tmp_path / "out", folder)
    ids = torch.randint(3, llm.config.vocab_size, (2, 30), generator=torch.Generator().manual_seed(1))
    expected = llm.logits(ids.tolist())
    state = hf_state_dict(llm.model)
    published = load_file(folder / "model.safetensors")  # the names and tensors as transformers saved them
    assert set(state) == {k for k in published if "rotary" not in k}
    assert all(torch.equal(state[k], published[k]) for k in state)
    if family == "japanese_stablelm_alpha":
        reloaded = kataru.load(exported, dtype="float32").logits(ids.tolist())
    else:
        import transformers

        model = transformers.AutoModelForCausalLM.from_pretrained(exported, dtype=torch.float32).eval()
        with torch.no_grad():
            reloaded = model(ids).logits
    assert (reloaded - expected).abs().max().item() < 1e-4


def test_every_published_tensor_is_planned_whole(checkpoints: dict) -> None:
    """The plan's row ranges tile each published tensor exactly once (what makes it invertible)."""
    for family in FAMILIES:
        config = kataru.load(checkpoints[family][0]).config
        plan = weight_plan(config)
        covered: dict[str, list[tuple[int, int]]] = {}
        for segments in plan.values():
            for source, start, end in segments:
                covered.setdefault(source, []).append((start, end))
        for source, ranges in covered.items():
            ranges.sort()
            assert ranges[0][0] == 0 and all(a[1] == b[0] for a, b in pairwise(ranges))
            assert ranges[-1][1] == source_rows(plan)[source]


def test_a_quantized_model_is_not_exported(checkpoints: dict, tmp_path: Path) -> None:
    llm = kataru.load(checkpoints["llama"][0], quantize="int8")
    with pytest.raises(KataruError, match=r"cannot be exported.*unquantized"):
        save_hf(llm.model, read_config_file(checkpoints["llama"][0]), tmp_path, None)
