"""Every family against its reference: float32 logits, greedy continuations, cache, batching, file layouts."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from helpers import FAMILIES, generate_alone, make_checkpoint

import kataru
from kataru import kernels
from kataru.engine import Engine
from kataru.sampling import SamplingParams

LOGIT_TOL = 1e-4


def reference_logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        out = model(ids)
    return out.logits if hasattr(out, "logits") else out


def reference_greedy(model: torch.nn.Module, ids: list[int], new_tokens: int) -> list[int]:
    x = torch.tensor([ids])
    if hasattr(model, "generate"):
        out = model.generate(x, do_sample=False, max_new_tokens=new_tokens, eos_token_id=None, pad_token_id=0)
        return out[0, len(ids):].tolist()
    return model.greedy(x, new_tokens)[0].tolist()


def random_prompts(vocab: int, lengths: list[int], seed: int = 1) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, vocab, (n,), generator=g).tolist() for n in lengths]


@pytest.mark.parametrize("family", FAMILIES)
def test_logits_match_reference(family: str, checkpoints: dict) -> None:
    folder, ref = checkpoints[family]
    llm = kataru.load(folder, dtype="float32")
    assert llm.config.family == family
    ids = torch.tensor(random_prompts(llm.config.vocab_size, [50, 50]))  # longer than Mistral's test window
    expected = reference_logits(ref, ids)
    got = llm.logits(ids.tolist())
    assert got.dtype == torch.float32 and got.shape == expected.shape
    assert (got - expected).abs().max().item() < LOGIT_TOL
    assert expected.std() > 0.1  # the comparison is between non-trivial logits


@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_continuation_matches_reference(family: str, checkpoints: dict) -> None:
    folder, ref = checkpoints[family]
    llm = kataru.load(folder, dtype="float32")
    prompt = random_prompts(llm.config.vocab_size, [12], seed=len(family))[0]
    expected = reference_greedy(ref, prompt, 32)
    params = SamplingParams(max_new_tokens=32, do_sample=False, ignore_eos=True)
    assert generate_alone(llm.model, prompt, params) == expected  # no cache: the tests' reference loop
    for chunk in (None, 5):  # the engine: the cache, whole or chunked prompts
        engine = Engine(llm.model, llm.eos_ids, max_batch=1, prefill_chunk=chunk)
        request = engine.submit(prompt, params)
        engine.run()
        assert request.tokens == expected, f"prefill_chunk={chunk}"


@pytest.mark.parametrize("family", FAMILIES)
def test_batch_of_different_lengths_equals_one_by_one(family: str, checkpoints: dict) -> None:
    folder, _ = checkpoints[family]
    llm = kataru.load(folder, dtype="float32")
    prompts = random_prompts(llm.config.vocab_size, [5, 17, 11], seed=7)
    params = SamplingParams(max_new_tokens=20, do_sample=False, ignore_eos=True, repetition_penalty=1.1)

    engine = Engine(llm.model, llm.eos_ids, max_batch=3)
    requests = [engine.submit(p, params) for p in prompts]
    engine.run()
    assert [r.tokens for r in requests] == [generate_alone(llm.model, p, params) for p in prompts]


@pytest.mark.parametrize("layout", ["bin", "sharded"])
@pytest.mark.parametrize("family", ["llama", "japanese_stablelm_alpha"])
def test_bin_and_sharded_checkpoints(family: str, layout: str, tokenizer_dirs: dict, tmp_path: Path) -> None:
    ref = make_checkpoint(family, tokenizer_dirs, tmp_path, layout=layout)
    if layout == "bin":
        assert (tmp_path / "pytorch_model.bin").is_file() and not list(tmp_path.glob("*.safetensors"))
    else:
        assert (tmp_path / "model.safetensors.index.json").is_file()
        assert len(list(tmp_path.glob("*.safetensors"))) > 1
    llm = kataru.load(tmp_path, dtype="float32")
    ids = torch.tensor(random_prompts(llm.config.vocab_size, [16]))
    assert (llm.logits(ids.tolist()) - reference_logits(ref, ids)).abs().max().item() < LOGIT_TOL


def test_tied_embeddings_and_bfloat16(tokenizer_dirs: dict, tmp_path: Path) -> None:
    ref = make_checkpoint("llama", tokenizer_dirs, tmp_path, tie_word_embeddings=True)
    llm = kataru.load(tmp_path, dtype="float32")
    assert llm.model.output.weight is llm.model.tok_embeddings.weight
    ids = torch.tensor(random_prompts(llm.config.vocab_size, [16]))
    expected = reference_logits(ref, ids)
    assert (llm.logits(ids.tolist()) - expected).abs().max().item() < LOGIT_TOL
    half = kataru.load(tmp_path, dtype="bfloat16")
    assert half.model.tok_embeddings.weight.dtype == torch.bfloat16
    # bfloat16 keeps 8 mantissa bits: logits of size ~5 stay within a few tenths.
    assert (half.logits(ids.tolist()) - expected).abs().max().item() < 0.5


def test_float16_checkpoint_takes_the_cpu_paths(tokenizer_dirs: dict, tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """A checkpoint saved in fp16 loads as fp16 (dtype auto) and runs on kataru's CPU paths: the prompt's rows
    through the float32 GEMM over converted weight tiles, decode rows through the fp16 kernel, each rounding
    once to fp16, so the logits stay within fp16's few bits of those of the same weights in float32."""
    ref = make_checkpoint("gpt_neox", tokenizer_dirs, tmp_path)
    ref.to(torch.float16).save_pretrained(tmp_path)
    llm = kataru.load(tmp_path)
    assert llm.model.tok_embeddings.weight.dtype == torch.float16
    ids = torch.tensor(random_prompts(llm.config.vocab_size, [40]))
    expected = reference_logits(ref.float(), ids)
    assert (llm.logits(ids.tolist()) - expected).abs().max().item() < 0.05
    if kernels.available():
        calls: list[int] = []
        kernel = kernels.linear_half
        monkeypatch.setattr(kernels, "linear_half", lambda x, *args: calls.append(x.dtype) or kernel(x, *args))
        out = llm.complete(["日本語のテスト"], raw=True, temperature=0, max_new_tokens=4, ignore_eos=True)[0]
        assert len(out.token_ids) == 4 and calls and set(calls) == {torch.float16}


def test_info_reports_the_checkpoint(checkpoints: dict) -> None:
    folder, ref = checkpoints["mistral"]
    info = kataru.load(folder).info()
    assert info["family"] == "mistral"
    assert info["parameters"] == sum(p.numel() for p in ref.parameters())
    assert info["kv_heads"] == 2 and info["heads"] == 4
    assert info["prompt_style"] == "alpaca-ja"
    assert info["eos_token_ids"] == [2]
    assert info["dtype"] == "float32"


def test_auto_dtype_honours_the_checkpoint(tokenizer_dirs: dict, tmp_path: Path) -> None:
    ref = make_checkpoint("mistral", tokenizer_dirs, tmp_path)
    ref.to(torch.bfloat16).save_pretrained(tmp_path)
    assert kataru.load(tmp_path).model.tok_embeddings.weight.dtype == torch.bfloat16
    assert kataru.load(tmp_path, dtype="float32").model.tok_embeddings.weight.dtype == torch.float32


def test_old_stablelm_epoch_config(tokenizer_dirs: dict, tmp_path: Path) -> None:
    """Older 3B-4E1T uploads: model_type stablelm_epoch with remote-code field names."""
    import json

    ref = make_checkpoint("stablelm", tokenizer_dirs, tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    rope = config.pop("rope_parameters")
    config.update(model_type="stablelm_epoch", architectures=["StableLMEpochForCausalLM"], rope_pct=0.25,
                  rope_theta=rope["rope_theta"], norm_eps=config.pop("layer_norm_eps"))
    (tmp_path / "config.json").write_text(json.dumps(config))
    llm = kataru.load(tmp_path, dtype="float32")
    assert llm.config.rotary_dim == 4
    ids = torch.tensor(random_prompts(llm.config.vocab_size, [16]))
    assert (llm.logits(ids.tolist()) - reference_logits(ref, ids)).abs().max().item() < LOGIT_TOL
