"""Sampling defaults belong to a checkpoint, not to an architecture: a seed gets its card's `generate(...)`
arguments, any other checkpoint its generation_config.json and then transformers' defaults; `info` says
which applied and why."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

import kataru
from kataru.errors import KataruError


def copy_of(folder: Path, where: Path) -> Path:
    shutil.copytree(folder, where)
    return where


def test_a_seed_folder_gets_its_cards_sampling(checkpoints: dict, tmp_path: Path) -> None:
    seed = copy_of(checkpoints["llama"][0], tmp_path / "llm-jp-3.1-1.8b-instruct4")
    (seed / "generation_config.json").write_text(json.dumps({"temperature": 0.1, "do_sample": True}))
    llm = kataru.load(seed)
    d = llm.defaults
    assert (d.do_sample, d.temperature, d.top_p, d.repetition_penalty, d.max_new_tokens) == (True, 0.7, 0.95, 1.05, 100)
    assert "model card of llm-jp/llm-jp-3.1-1.8b-instruct4" in llm.info()["sampling_source"]
    cached = tmp_path / "hub" / "models--stabilityai--japanese-stablelm-instruct-gamma-7b" / "snapshots" / "bb4590d4"
    gamma = kataru.load(copy_of(checkpoints["mistral"][0], cached))  # a Hugging Face cache's layout
    assert (gamma.defaults.temperature, gamma.defaults.top_p, gamma.defaults.max_new_tokens) == (1.0, 0.95, 256)
    assert gamma.prompt_style.name == "alpaca-ja"


def test_any_other_checkpoint_gets_its_generation_config_then_transformers_defaults(checkpoints: dict,
                                                                                     tmp_path: Path) -> None:
    other = copy_of(checkpoints["llama"][0], tmp_path / "some-llama-finetune")
    (other / "generation_config.json").write_text(json.dumps({"do_sample": True, "temperature": 0.6, "top_p": 0.9,
                                                              "eos_token_id": 2}))
    llm = kataru.load(other)
    d = llm.defaults
    assert (d.do_sample, d.temperature, d.top_p, d.top_k, d.repetition_penalty) == (True, 0.6, 0.9, 50, 1.0)
    assert llm.info()["sampling_source"] == ("generation_config.json (do_sample, temperature, top_p), then "
                                             "transformers' defaults")
    (other / "generation_config.json").unlink()
    plain = kataru.load(other)
    assert plain.defaults.greedy and plain.defaults.max_new_tokens == 128  # transformers: do_sample=False
    assert plain.info()["sampling_source"].startswith("transformers' defaults")
    # a seed's name on another architecture is not that seed
    impostor = copy_of(checkpoints["mistral"][0], tmp_path / "llm-jp-3.1-1.8b-instruct4")
    assert kataru.load(impostor).defaults.greedy


def test_a_quantized_folder_honours_dtype_and_refuses_another_method(checkpoints: dict, tmp_path: Path) -> None:
    import torch

    quant = kataru.load(checkpoints["llama"][0], dtype="bfloat16", quantize="int8")
    quant.save_quantized(tmp_path / "q")
    as_saved = kataru.load(tmp_path / "q")
    assert as_saved.dtype == torch.bfloat16 and as_saved.quantization == "int8"
    wider = kataru.load(tmp_path / "q", dtype="float32")  # honoured: activations, embeddings and norms widen
    assert wider.dtype == torch.float32 and wider.quantization == "int8"
    ids = [list(range(5, 40))]
    cosine = torch.nn.functional.cosine_similarity(wider.logits(ids).flatten(), as_saved.logits(ids).flatten(), 0)
    assert cosine > 0.999
    assert kataru.load(tmp_path / "q", quantize="int8").quantization == "int8"  # the same method: as saved
    with pytest.raises(KataruError, match="already quantized with int8; load it without quantize="):
        kataru.load(tmp_path / "q", quantize="int4")
