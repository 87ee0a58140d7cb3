"""Weight-only int8/int4: errors within a bound derived from the rounding, and save/reload."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

import kataru
from kataru.cli import main
from kataru.errors import KataruError
from kataru.quantize import Int4Linear, Int8Linear


def layer(out_features: int = 96, in_features: int = 128) -> nn.Linear:
    torch.manual_seed(0)
    linear = nn.Linear(in_features, out_features, bias=True)
    with torch.no_grad():
        linear.weight.normal_(0, 0.2)
    return linear.to(torch.bfloat16)


def test_int8_error_is_within_the_rounding_bound() -> None:
    """Rounding moves each weight by at most half a step, max|w_row|/254, so
    |y_q - y| <= sum_k |x_k| * max|w_row| / 254, plus bf16 rounding of the output (2^-8 relative)."""
    linear = layer()
    x = torch.randn(5, 128).bfloat16()
    exact = x.float() @ linear.weight.float().t() + linear.bias.float()
    got = Int8Linear.from_linear(linear)(x).float()
    bound = x.float().abs().sum(-1, keepdim=True) * linear.weight.float().abs().amax(1) / 254
    assert ((got - exact).abs() <= bound + exact.abs() / 128 + 1e-2).all()
    assert (got - exact).abs().max() > 0  # it is quantized


def test_int4_error_is_within_the_rounding_bound() -> None:
    """Groups of 64 with 16 levels: each weight moves by at most (max-min)/30 of its group."""
    linear = layer()
    x = torch.randn(5, 128).bfloat16()
    exact = x.float() @ linear.weight.float().t() + linear.bias.float()
    got = Int4Linear.from_linear(linear, group_size=64)(x).float()
    w = linear.weight.float().reshape(96, 2, 64)
    half_step = (w.amax(-1) - w.amin(-1)) / 30  # [out, groups]
    x_mass = x.float().abs().reshape(5, 2, 64).sum(-1)  # [rows, groups]
    bound = x_mass @ half_step.t()
    assert ((got - exact).abs() <= bound + exact.abs() / 64 + 2e-2).all()


@pytest.mark.parametrize("method", ["int8", "int4"])
def test_quantized_model_stays_close_and_reloads(method: str, checkpoints: dict, tmp_path: Path,
                                                 capsys: pytest.CaptureFixture) -> None:
    folder = checkpoints["llama"][0]
    base = kataru.load(folder, dtype="bfloat16")
    quant = kataru.load(folder, dtype="bfloat16", quantize=method)
    assert quant.info()["quantization"] == method
    ids = [list(range(5, 60))]
    a, b = base.logits(ids), quant.logits(ids)
    cosine = torch.nn.functional.cosine_similarity(a.flatten(), b.flatten(), dim=0)
    # Uniform rounding of Gaussian weights leaves a relative error of (range/levels)/sqrt(12)/sigma per matmul:
    # ~0.007 for int8 (range ~6 sigma over 254 steps) and ~0.09 for int4 (~4.6 sigma over 15 steps, groups of
    # 64). Seven matmuls lie on the path (2 layers x 3, head), adding in quadrature to ~0.02 and ~0.24, i.e.
    # a cosine of ~0.9998 and ~0.97 before a random network amplifies it; the margins allow 10x and ~4x that.
    assert cosine > (0.995 if method == "int8" else 0.85)
    assert main(["quantize", str(folder), str(tmp_path / "q"), "--method", method, "--dtype", "bfloat16"]) == 0
    capsys.readouterr()
    assert json.loads((tmp_path / "q" / "kataru_quantization.json").read_text())["method"] == method
    reloaded = kataru.load(tmp_path / "q")
    assert reloaded.quantization == method
    assert torch.equal(reloaded.logits(ids), b)
    assert reloaded.generate("x", temperature=0, max_new_tokens=6) == quant.generate("x", temperature=0,
                                                                                  max_new_tokens=6)
    marker = tmp_path / "q" / "kataru_quantization.json"
    old = {k: v for k, v in json.loads(marker.read_text()).items() if k != "format"}  # as kataru 1 wrote it
    marker.write_text(json.dumps(old))
    with pytest.raises(KataruError, match=r"older layout.*quantize the original checkpoint again"):
        kataru.load(tmp_path / "q")



def test_a_quantized_copy_shares_the_weights_and_leaves_the_original_alone(checkpoints: dict) -> None:
    """`kataru bench` quantizes a copy of a model an engine has already run on: the copy shares the tensors it
    does not quantize, the original keeps its own linears, and an engine on either owns its own cache."""
    from kataru.engine import Engine
    from kataru.quantize import Int8Linear, quantize
    from kataru.sampling import SamplingParams

    llm = kataru.load(checkpoints["llama"][0], dtype="bfloat16")
    params = SamplingParams(max_new_tokens=6, do_sample=False, ignore_eos=True)
    first = list(range(5, 30))
    follow_up = [*first, 40, 41, 42]
    engine = Engine(llm.model, llm.eos_ids, max_batch=2, prefill_chunk=8)
    engine.submit(first, params)
    engine.run()
    copy = quantize(llm.model, "int8", inplace=False)
    assert copy.tok_embeddings.weight is llm.model.tok_embeddings.weight
    assert isinstance(copy.layers[0].attention.wqkv, Int8Linear)
    assert not isinstance(llm.model.layers[0].attention.wqkv, Int8Linear)
    other = Engine(copy, llm.eos_ids, max_batch=2)
    other.submit(list(range(60, 90)), params)
    other.run()
    request = engine.submit(follow_up, params)  # reuses the first prompt's row, which the copy did not touch
    engine.run()
    assert request.reused == 24
    fresh = Engine(llm.model, llm.eos_ids, max_batch=1, prefill_chunk=8)
    expected = fresh.submit(follow_up, params)
    fresh.run()
    assert request.tokens == expected.tokens

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (torch's packed kernels)")


@needs_cuda
@pytest.mark.parametrize("method", ["int8", "int4"])
def test_quantized_linears_on_cuda_compute_their_dequantized_weights(method: str) -> None:
    """On a GPU the layers take torch's packed kernels with bf16 activations: the product of the dequantized
    weight up to bf16 rounding (2^-8 relative per weight and for the output, summed over |x||w|: 1/64 is a
    4x margin)."""
    linear = layer(out_features=128, in_features=256)
    module = Int8Linear.from_linear(linear) if method == "int8" else Int4Linear.from_linear(linear, group_size=64)
    weight = (module.plain_weight().float() * module.scales.float()[:, None] if method == "int8"
              else module.dequantize())
    x = torch.randn(5, 256).bfloat16()
    exact = x.float() @ weight.t() + module.bias.float()
    got = module.cuda()(x.cuda()).float().cpu()
    bound = x.float().abs() @ weight.abs().t() / 64 + 1e-2
    assert ((got - exact).abs() <= bound).all()


@needs_cuda
@pytest.mark.parametrize("method", ["int8", "int4"])
def test_quantized_model_on_cuda_stays_close_and_batches_like_alone(method: str, checkpoints: dict) -> None:

    from kataru.engine import Engine
    from kataru.sampling import SamplingParams

    folder = checkpoints["llama"][0]
    base = kataru.load(folder, dtype="bfloat16", device="cuda")
    quant = kataru.load(folder, dtype="bfloat16", quantize=method, device="cuda")
    ids = [list(range(5, 60))]
    cosine = torch.nn.functional.cosine_similarity(base.logits(ids).flatten(), quant.logits(ids).flatten(), dim=0)
    assert cosine > (0.995 if method == "int8" else 0.85)  # the bounds of the CPU test above
    params = SamplingParams(max_new_tokens=8, do_sample=False, ignore_eos=True)
    prompts = [list(range(5, 5 + n)) for n in (4, 11, 7)]
    alone = []
    for p in prompts:  # each alone in an engine: the same graphed steps at batch 1
        single = Engine(quant.model, quant.eos_ids, max_batch=1)
        alone.append(single.submit(p, params))
        single.run()
    alone = [r.tokens for r in alone]
    engine = Engine(quant.model, quant.eos_ids, max_batch=3)  # its decode step replays CUDA graphs
    requests = [engine.submit(p, params) for p in prompts]
    engine.run()
    assert [r.tokens for r in requests] == alone
