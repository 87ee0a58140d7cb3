"""A reference Japanese-StableLM-Base-Alpha model, written from the upstream architecture description.

Upstream runs it as remote code, which transformers cannot import offline, so the parity test needs an
independent implementation: this one follows `modeling_japanese_stablelm_alpha.py` as described in
shared/research/architectures.md, in its own weight layout (fused per-head-interleaved qkv, packed MLP,
affine-free input LayerNorm, xPos rotary). It shares no code with kataru. Its invariants are checked by
tests/test_alpha_reference.py.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class AlphaConfig:
    def __init__(self, vocab_size: int = 65536, hidden_size: int = 4096, num_hidden_layers: int = 32,
                 num_attention_heads: int = 32, rotary_pct: float = 0.25, rotary_emb_base: int = 10000,
                 rotary_scale_base: int = 512, max_position_embeddings: int = 2048, layer_norm_eps: float = 1e-5,
                 use_parallel_residual: bool = True, tie_word_embeddings: bool = False,
                 bos_token_id: int = 3, eos_token_id: int = 3) -> None:
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.rotary_pct = rotary_pct
        self.rotary_emb_base = rotary_emb_base
        self.rotary_scale_base = rotary_scale_base
        self.max_position_embeddings = max_position_embeddings
        self.layer_norm_eps = layer_norm_eps
        self.use_parallel_residual = use_parallel_residual
        self.tie_word_embeddings = tie_word_embeddings
        self.bos_token_id = bos_token_id
        self.eos_token_id = eos_token_id

    def to_json(self) -> dict:
        d = dict(vars(self))
        d.update(model_type="japanese_stablelm_alpha", architectures=["JapaneseStableLMAlphaForCausalLM"],
                 hidden_act="silu", torch_dtype="float32")
        return d


class XPosRotary(nn.Module):
    def __init__(self, dim: int, max_positions: int, base: float, scale_base: float) -> None:
        super().__init__()
        inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2).float() / dim))
        self.register_buffer("inv_freq", inv_freq)
        scale = (torch.arange(0, dim, 2).float() + 0.4 * dim) / (1.4 * dim)
        self.register_buffer("scale", scale)
        t = torch.arange(max_positions).float()
        freqs = torch.outer(t, inv_freq)
        power = (t - max_positions // 2) / scale_base
        scale_cached = scale ** power.unsqueeze(-1)
        self.cos_q = torch.cos(freqs) * scale_cached
        self.sin_q = torch.sin(freqs) * scale_cached
        self.cos_k = torch.cos(freqs) / scale_cached
        self.sin_k = torch.sin(freqs) / scale_cached


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
    cos = cos[position_ids].unsqueeze(1)
    sin = sin[position_ids].unsqueeze(1)
    cos = torch.cat((cos, cos), dim=-1)  # tiled to the full rotary width
    sin = torch.cat((sin, sin), dim=-1)
    return x * cos + rotate_half(x) * sin


class AlphaAttention(nn.Module):
    def __init__(self, config: AlphaConfig) -> None:
        super().__init__()
        self.n_head = config.num_attention_heads
        self.head_dim = config.hidden_size // self.n_head
        self.rotary_ndims = int(self.head_dim * config.rotary_pct)
        self.query_key_value = nn.Linear(config.hidden_size, 3 * config.hidden_size, bias=False)
        self.dense = nn.Linear(config.hidden_size, config.hidden_size, bias=False)
        self.rotary_emb = XPosRotary(self.rotary_ndims, config.max_position_embeddings, config.rotary_emb_base,
                                     config.rotary_scale_base)

    def forward(self, x: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        qkv = self.query_key_value(x).view(b, t, self.n_head, 3 * self.head_dim).permute(0, 2, 1, 3)
        q, k, v = qkv[..., :self.head_dim], qkv[..., self.head_dim:2 * self.head_dim], qkv[..., 2 * self.head_dim:]
        r = self.rotary_ndims
        e = self.rotary_emb
        q = torch.cat((apply_rotary(q[..., :r], e.cos_q, e.sin_q, position_ids), q[..., r:]), dim=-1)
        k = torch.cat((apply_rotary(k[..., :r], e.cos_k, e.sin_k, position_ids), k[..., r:]), dim=-1)
        scores = torch.matmul(q, k.transpose(-1, -2)) / math.sqrt(self.head_dim)
        causal = torch.ones(t, t, dtype=torch.bool).tril()
        scores = scores.masked_fill(~causal, torch.finfo(scores.dtype).min)
        probs = torch.softmax(scores.float(), dim=-1).to(v.dtype)
        out = torch.matmul(probs, v).permute(0, 2, 1, 3).reshape(b, t, -1)
        return self.dense(out)


class AlphaMLP(nn.Module):
    def __init__(self, config: AlphaConfig) -> None:
        super().__init__()
        intermediate = 256 * math.ceil(int(8 * config.hidden_size / 3) / 256)
        self.packed_input_proj = nn.Linear(config.hidden_size, 2 * intermediate, bias=False)
        self.out_proj = nn.Linear(intermediate, config.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ff, ff_gate = self.packed_input_proj(x).chunk(2, dim=-1)
        return self.out_proj(ff * F.silu(ff_gate))


class AlphaLayer(nn.Module):
    def __init__(self, config: AlphaConfig) -> None:
        super().__init__()
        self.input_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps, elementwise_affine=False)
        self.post_attention_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.attention = AlphaAttention(config)
        self.mlp = AlphaMLP(config)

    def forward(self, x: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        return x + self.attention(self.input_layernorm(x), position_ids) + self.mlp(self.post_attention_layernorm(x))


class AlphaModel(nn.Module):
    def __init__(self, config: AlphaConfig) -> None:
        super().__init__()
        self.config = config
        self.embed_in = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(AlphaLayer(config) for _ in range(config.num_hidden_layers))
        self.final_layer_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)


class AlphaForCausalLM(nn.Module):
    def __init__(self, config: AlphaConfig) -> None:
        super().__init__()
        self.config = config
        self.transformer = AlphaModel(config)
        self.embed_out = nn.Linear(config.hidden_size, config.vocab_size, bias=False)

    @torch.no_grad()
    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        position_ids = torch.arange(input_ids.shape[1]).unsqueeze(0)
        x = self.transformer.embed_in(input_ids)
        for layer in self.transformer.layers:
            x = layer(x, position_ids)
        return self.embed_out(self.transformer.final_layer_norm(x))

    @torch.no_grad()
    def greedy(self, input_ids: torch.Tensor, new_tokens: int) -> torch.Tensor:
        """Greedy continuation by full recomputation (no cache), the simplest correct decoder."""
        ids = input_ids
        for _ in range(new_tokens):
            nxt = self(ids)[:, -1].argmax(-1, keepdim=True)
            ids = torch.cat((ids, nxt), dim=1)
        return ids[:, input_ids.shape[1]:]
