"""Hand checks of tests/alpha_reference.py against the invariants of the architecture it describes."""

from __future__ import annotations

import torch
from alpha_reference import AlphaConfig, AlphaForCausalLM, AlphaLayer, XPosRotary, apply_rotary


def test_xpos_scores_depend_only_on_relative_position() -> None:
    rotary = XPosRotary(dim=8, max_positions=64, base=10000, scale_base=16)
    q, k = torch.randn(1, 1, 1, 8), torch.randn(1, 1, 1, 8)

    def score(m: int, n: int) -> float:
        qm = apply_rotary(q, rotary.cos_q, rotary.sin_q, torch.tensor([[m]]))
        kn = apply_rotary(k, rotary.cos_k, rotary.sin_k, torch.tensor([[n]]))
        return float((qm * kn).sum())

    assert abs(score(10, 3) - score(40, 33)) < 1e-4
    assert abs(score(10, 3) - score(10, 9)) > 1e-3  # and it does depend on the distance


def test_xpos_scale_decays_with_distance_and_vanishes_with_a_huge_base() -> None:
    rotary = XPosRotary(dim=8, max_positions=64, base=10000, scale_base=16)
    # For a query and key at the same position, the scale cancels: cos_q*cos_k + sin_q*sin_k = 1.
    same = rotary.cos_q * rotary.cos_k + rotary.sin_q * rotary.sin_k
    assert torch.allclose(same, torch.ones_like(same), atol=1e-5)
    scale = (torch.arange(0, 8, 2).float() + 0.4 * 8) / (1.4 * 8)
    assert (scale < 1).all() and (scale > 0).all()  # so scale**(m-n) shrinks for distant keys
    plain = XPosRotary(dim=8, max_positions=64, base=10000, scale_base=1e12)
    freqs = torch.outer(torch.arange(64).float(), 1.0 / (10000 ** (torch.arange(0, 8, 2).float() / 8)))
    assert torch.allclose(plain.cos_q, freqs.cos(), atol=1e-6) and torch.allclose(plain.sin_k, freqs.sin(), atol=1e-6)


def test_layer_shapes_and_parallel_residual() -> None:
    config = AlphaConfig(vocab_size=32, hidden_size=64, num_hidden_layers=1, num_attention_heads=4,
                         max_position_embeddings=32)
    layer = AlphaLayer(config)
    assert not list(layer.input_layernorm.parameters())  # LN1 has no affine parameters
    assert layer.post_attention_layernorm.bias is not None
    assert AlphaForCausalLM(AlphaConfig(num_hidden_layers=0)).transformer.embed_in.weight.shape == (65536, 4096)
    big = AlphaConfig(num_hidden_layers=1)
    from alpha_reference import AlphaMLP

    assert AlphaMLP(big).out_proj.in_features == 11008
    with torch.no_grad():
        layer.attention.dense.weight.zero_()
        layer.mlp.out_proj.weight.zero_()
    x = torch.randn(1, 5, 64)
    assert torch.equal(layer(x, torch.arange(5).unsqueeze(0)), x)  # h = x + attn + mlp


def test_attention_is_causal() -> None:
    config = AlphaConfig(vocab_size=32, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                         max_position_embeddings=32)
    model = AlphaForCausalLM(config)
    ids = torch.randint(0, 32, (1, 10))
    changed = ids.clone()
    changed[0, 7] = (ids[0, 7] + 1) % 32
    a, b = model(ids), model(changed)
    assert torch.allclose(a[:, :7], b[:, :7]) and not torch.allclose(a[:, 7:], b[:, 7:])
