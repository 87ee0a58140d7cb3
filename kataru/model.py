"""The one transformer that runs every family (read top to bottom).

Family differences are `ModelConfig` fields: the norm kind, how much of each head gets rotary and
whether it carries Alpha's xPos scaling, parallel or sequential residual, SwiGLU or GELU MLP, biases,
grouped-query attention, a sliding window and tied embeddings. Weights are stored fused (one qkv
projection, one gate+up projection) so a decode step runs few, large matmuls; `checkpoint.py` maps each
family's published layout onto these names.

Generation is `prefill` (many tokens into a preallocated KV cache) followed by one-token decode steps;
rows of a batch may be left-padded, so every call takes per-row rotary positions and a key mask.
"""

from __future__ import annotations

import threading
import weakref
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kataru import kernels
from kataru.config import ModelConfig

ACTIVATIONS = {
    "gelu": lambda x: F.gelu(x),
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_fast": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "relu": F.relu,
    "silu": F.silu,
}


class Linear(nn.Linear):
    """nn.Linear with two CPU paths for bf16 and fp16, where torch's own 16-bit matmuls are slow (AVX2, no
    native bf16 or fp16 arithmetic).

    Many rows (prefill): torch's bf16 GEMM is compute-bound (a 512-token prefill of the llm-jp-3.1-1.8b
    shape measured 7 tok/s); the fp32 GEMM on the weight converted to float32 is 6x faster from 64 rows up
    (`upcast_matmul`). Few rows (decode): `kataru.kernels` streams the 16-bit weights once for the whole
    batch, where torch's time grows with every row.
    """

    upcast_rows = 32

    def forward(self, x: Tensor) -> Tensor:
        if x.device.type == "cpu" and x.dtype in kernels.HALF and self.weight.dtype == x.dtype:
            if x.numel() // x.shape[-1] >= self.upcast_rows:
                return upcast_matmul(x, self.weight, self.bias)
            if kernels.usable(x, self.weight):
                return kernels.linear_half(x, self.weight, self.bias)
        return super().forward(x)


_upcast_scratch = threading.local()
UPCAST_TILE = 1 << 20  # weight elements converted per GEMM call: 4 MB of float32, which stays in cache


def upcast_matmul(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """x @ weight.T through the float32 GEMM, converting the 16-bit weight a tile of output rows at a time.

    Converting the whole weight first writes and reads back twice its 16-bit bytes in float32 through memory;
    a tile converted into a small buffer each thread keeps is still in cache when its GEMM reads it. On the
    llm-jp-3.1-1.8b shape a prefill is 1.36x faster at 64 tokens, 1.16x at 128 and even at 512
    (`scripts/bench_switch.py upcast`). Where autograd needs the matmul, the whole weight is converted.
    """
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, weight, bias)):
        return F.linear(x.float(), weight.float(), None if bias is None else bias.float()).to(x.dtype)
    n, k = weight.shape
    rows = min(n, max(8, UPCAST_TILE // k))
    flat = x.reshape(-1, k).float().t()  # [k, tokens]: each tile's GEMM writes whole rows of out_t
    out_t = torch.empty(n, flat.shape[1], dtype=torch.float32, device=x.device)
    buffer = getattr(_upcast_scratch, "buffer", None)
    if buffer is None or buffer.numel() < rows * k:
        with torch.inference_mode(False):  # a normal tensor: writable under no_grad as well as inference mode
            buffer = _upcast_scratch.buffer = torch.empty(rows * k, dtype=torch.float32)
    bias32 = None if bias is None else bias.float().unsqueeze(1)
    for i in range(0, n, rows):
        j = min(i + rows, n)
        tile = buffer[:(j - i) * k].view(j - i, k).copy_(weight[i:j])
        if bias32 is None:
            torch.mm(tile, flat, out=out_t[i:j])
        else:
            torch.addmm(bias32[i:j], tile, flat, out=out_t[i:j])
    out = out_t.t().to(x.dtype, memory_format=torch.contiguous_format)
    return out.view(*x.shape[:-1], n)


class KVCache(nn.Module):
    """Keys and values for `max_batch` rows and `max_seq_len` slots, allocated once."""

    def __init__(self, max_batch: int, max_seq_len: int, n_kv_head: int, head_dim: int, dtype: torch.dtype,
                 device: torch.device | str | None = None) -> None:
        super().__init__()
        shape = (max_batch, n_kv_head, max_seq_len, head_dim)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    def update(self, start: int | Tensor, k: Tensor, v: Tensor, rows: Tensor | None = None,
               span: int | None = None) -> tuple[Tensor, Tensor]:
        """Write the new keys/values and return every filled slot of the rows written.

        start int: slots [start, start+T) of rows `rows` (default: the first B rows). start Tensor [B]: one
        token per row, each at its own slot (continuous batching, where rows hold sequences of any length),
        returning the first `span` slots (max(start) + 1, which Transformer.forward passes down so that no
        layer waits on the device).
        """
        b, _, t, _ = k.shape
        index = slice(0, b) if rows is None else rows
        if isinstance(start, Tensor):
            self.write_slots(start, k, v, rows)
            assert span is not None, "a tensor start needs its span"
            end = span
        else:
            end = start + t
            self.k[index, :, start:end] = k
            self.v[index, :, start:end] = v
        return self.k[index, :, :end], self.v[index, :, :end]

    def write_slots(self, slots: Tensor, k: Tensor, v: Tensor, rows: Tensor | None) -> None:
        """Write one token per row at its own slot."""
        row_ids = torch.arange(k.shape[0], device=k.device) if rows is None else rows
        self.k[row_ids, :, slots] = k[:, :, 0]
        self.v[row_ids, :, slots] = v[:, :, 0]

    def attend(self, slots: Tensor, qkv: Tensor, rope: Tensor | None, rows: Tensor | None, n_head: int,
               window: int | None) -> Tensor:
        """One decode step on the CPU kernel, from the fused projection qkv [B, 1, W]: rotate and write each
        row's new key and value at its slot, then attend over the row's slots in place (no gathered copy of
        the cache). Returns [B, 1, n_head * D]."""
        b = qkv.shape[0]
        row_ids = torch.arange(b, device=qkv.device) if rows is None else rows
        tables = None if rope is None else rope.view(4, b, -1)
        return kernels.decode_attention(qkv.view(b, -1), tables, self.k, self.v, row_ids, slots, n_head,
                                        window).view(b, 1, -1)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        if x.numel() // x.shape[-1] < Linear.upcast_rows and kernels.norm_applicable(x, self.weight):
            return kernels.rms_norm(x, self.weight, self.eps)  # a decode step's rows: one call, not eight ops
        # Normalise in float32 as the reference implementations do, scale in the working dtype.
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


def make_norm(config: ModelConfig, affine: bool = True) -> nn.Module:
    if config.norm == "rmsnorm":
        return RMSNorm(config.dim, config.norm_eps)
    return nn.LayerNorm(config.dim, eps=config.norm_eps, elementwise_affine=affine, bias=config.norm_bias and affine)


class Rotary(nn.Module):
    """cos/sin tables for every position, with separate query and key tables for xPos.

    xPos scales the rotation by scale**power for queries and scale**-power for keys, with
    power = (pos - max_seq_len // 2) / scale_base, so attention scores decay with distance.
    """

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        d = config.rotary_dim
        # Built on the CPU, then moved to the default device (meta, CUDA): arange on meta imports torch._dynamo,
        # over a second of start-up.
        positions = torch.arange(config.max_seq_len, dtype=torch.float32, device="cpu")
        inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, d, 2, dtype=torch.int64, device="cpu").float() / d))
        freqs = torch.outer(positions, inv_freq)
        cos, sin = freqs.cos(), freqs.sin()
        if config.xpos_scale_base is None:
            cos_k, sin_k = cos, sin
        else:
            scale = (torch.arange(0, d, 2, dtype=torch.float32, device="cpu") + 0.4 * d) / (1.4 * d)
            power = (positions - config.max_seq_len // 2) / config.xpos_scale_base
            scale = scale ** power.unsqueeze(-1)
            cos, sin, cos_k, sin_k = cos * scale, sin * scale, cos / scale, sin / scale
        tables = [torch.cat((t, t), dim=-1) for t in (cos, sin, cos_k, sin_k)]
        tables = torch.stack(tables).to(torch.get_default_device())  # [4, positions, d]
        self.register_buffer("tables", tables, persistent=False)

    def forward(self, positions: Tensor, dtype: torch.dtype) -> Tensor:
        """[4, B, 1, T, d] tables (cos_q, sin_q, cos_k, sin_k) for positions [B, T]."""
        return self.tables[:, positions].unsqueeze(2).to(dtype)


def rotate_half(x: Tensor) -> Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    d = cos.shape[-1]
    if d == x.shape[-1]:
        return x * cos + rotate_half(x) * sin
    x_rot, x_pass = x[..., :d], x[..., d:]
    return torch.cat((x_rot * cos + rotate_half(x_rot) * sin, x_pass), dim=-1)


class Attention(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.wqkv = Linear(config.dim, config.q_size + 2 * config.kv_size, bias=config.qkv_bias)
        self.wo = Linear(config.q_size, config.dim, bias=config.o_bias)
        self.kv_cache: KVCache | None = None

    def forward(self, x: Tensor, rope: Tensor, mask: Tensor | None, start: int | Tensor | None,
                rows: Tensor | None = None, span: int | None = None) -> Tensor:
        c = self.config
        b, t, _ = x.shape
        qkv = self.wqkv(x)
        cache = self.kv_cache
        if (isinstance(start, Tensor) and t == 1 and cache is not None
                and kernels.attention_applicable(cache.k, x.dtype, c.head_dim)):
            rope = rope if c.rotary_dim else None
            return self.wo(cache.attend(start, qkv, rope, rows, c.n_head, c.sliding_window))
        q, k, v = qkv.split([c.q_size, c.kv_size, c.kv_size], dim=-1)
        q = q.view(b, t, c.n_head, c.head_dim).transpose(1, 2)
        k = k.view(b, t, c.n_kv_head, c.head_dim).transpose(1, 2)
        v = v.view(b, t, c.n_kv_head, c.head_dim).transpose(1, 2)
        if c.rotary_dim:
            q = apply_rotary(q, rope[0], rope[1])
            k = apply_rotary(k, rope[2], rope[3])
        if start is not None:
            assert self.kv_cache is not None, "call setup_caches() before decoding with a cache"
            k, v = self.kv_cache.update(start, k, v, rows, span)
        gqa = c.n_kv_head != c.n_head
        if mask is None:  # a fresh causal sequence, or one-token decode over all filled slots
            y = F.scaled_dot_product_attention(q, k, v, is_causal=t > 1, enable_gqa=gqa)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)
        return self.wo(y.transpose(1, 2).reshape(b, t, c.q_size))


class FeedForward(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.swiglu = config.mlp == "swiglu"
        width = 2 * config.intermediate_size if self.swiglu else config.intermediate_size
        self.w1 = Linear(config.dim, width, bias=config.mlp_bias)  # gate and up, fused, for SwiGLU
        self.w2 = Linear(config.intermediate_size, config.dim, bias=config.mlp_bias)
        self.act = ACTIVATIONS[config.activation]

    def forward(self, x: Tensor) -> Tensor:
        if self.swiglu:
            gate, up = self.w1(x).chunk(2, dim=-1)
            return self.w2(F.silu(gate) * up)
        return self.w2(self.act(self.w1(x)))


class Block(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.parallel = config.parallel_residual
        self.attention_norm = make_norm(config, affine=config.attn_norm_affine)
        self.attention = Attention(config)
        self.ffn_norm = make_norm(config)
        self.feed_forward = FeedForward(config)

    def forward(self, x: Tensor, rope: Tensor, mask: Tensor | None, start: int | Tensor | None,
                rows: Tensor | None = None, span: int | None = None) -> Tensor:
        h = self.attention(self.attention_norm(x), rope, mask, start, rows, span)
        if self.parallel:
            return x + h + self.feed_forward(self.ffn_norm(x))
        x = x + h
        return x + self.feed_forward(self.ffn_norm(x))


class Transformer(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.tok_embeddings = nn.Embedding(config.vocab_size, config.dim)
        self.layers = nn.ModuleList(Block(config) for _ in range(config.n_layer))
        self.norm = make_norm(config)
        self.output = Linear(config.dim, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.output.weight = self.tok_embeddings.weight
        self.rotary = Rotary(config)
        self.cache_rows = 0
        self.cache_len = 0
        self._cache_owner: weakref.ref | None = None

    @property
    def cache_owner(self) -> Any:
        """The Engine whose rows the cache holds (see Engine._pick_row). Held weakly: a model does not keep its
        engine alive, and copying the model does not copy the engine (its lock and worker thread cannot be)."""
        return None if self._cache_owner is None else self._cache_owner()

    @cache_owner.setter
    def cache_owner(self, owner: Any) -> None:
        self._cache_owner = None if owner is None else weakref.ref(owner)

    def setup_caches(self, max_batch: int, max_seq_len: int, keep: bool = False) -> None:
        """Preallocate the KV cache (reused when the request fits what is already there).

        keep: when it must grow, copy what the old rows held into the new cache (an engine's cached prefixes).
        """
        if max_batch <= self.cache_rows and max_seq_len <= self.cache_len:
            return
        c = self.config
        dtype, device = self.tok_embeddings.weight.dtype, self.tok_embeddings.weight.device
        rows, length = max(max_batch, self.cache_rows), max(max_seq_len, self.cache_len)
        for layer in self.layers:
            old = layer.attention.kv_cache
            layer.attention.kv_cache = None  # free before allocating when nothing is kept
            new = KVCache(rows if keep else max_batch, length if keep else max_seq_len, c.n_kv_head, c.head_dim,
                          dtype, device)
            if keep and old is not None:
                new.k[:old.k.shape[0], :, :old.k.shape[2]] = old.k
                new.v[:old.v.shape[0], :, :old.v.shape[2]] = old.v
            layer.attention.kv_cache = new
        if keep:
            self.cache_rows, self.cache_len = rows, length
        else:
            self.cache_rows, self.cache_len = max_batch, max_seq_len
            self.cache_owner = None

    def drop_caches(self) -> None:
        for layer in self.layers:
            layer.attention.kv_cache = None
        self.cache_rows = self.cache_len = 0
        self.cache_owner = None

    def forward(self, tokens: Tensor, positions: Tensor | None = None, start: int | Tensor | None = None,
                key_mask: Tensor | None = None, last_only: bool = False, rows: Tensor | None = None,
                span: int | None = None) -> Tensor:
        """Logits for tokens [B, T], written at KV-cache slots [start, start+T) (start=None: no cache).

        positions [B, T] are the rotary positions (they differ from slots for left-padded rows);
        key_mask [B, start+T] marks the slots holding real tokens (None: all of them); rows picks the
        cache rows (default the first B). A tensor start [B] decodes one token per row at its own slot;
        span = max(start) + 1 when the caller knows it (saves a device sync).
        """
        b, t = tokens.shape
        if isinstance(start, Tensor):
            positions = start.unsqueeze(1) if positions is None else positions
            span = span if span is not None else int(start.max()) + 1
            mask = self.row_mask(start, span)
        else:
            first = start or 0
            if positions is None:
                positions = torch.arange(first, first + t, device=tokens.device).expand(b, t)
            mask = self.attention_mask(t, first, key_mask, tokens.device)
        x = self.tok_embeddings(tokens)
        rope = self.rotary(positions, x.dtype)
        for layer in self.layers:
            x = layer(x, rope, mask, start, rows, span)
        if last_only:
            x = x[:, -1:]
        return self.output(self.norm(x))

    def row_mask(self, slots: Tensor, span: int) -> Tensor:
        """[B, 1, 1, span]: each row's query at slots[b] sees its own filled slots (and the window)."""
        keys = torch.arange(span, device=slots.device)
        mask = keys.unsqueeze(0) <= slots.unsqueeze(1)
        if self.config.sliding_window is not None:
            mask = mask & (slots.unsqueeze(1) - keys.unsqueeze(0) < self.config.sliding_window)
        return mask[:, None, None, :]

    def attention_mask(self, t: int, start: int, key_mask: Tensor | None, device: torch.device) -> Tensor | None:
        """Boolean [B|1, 1, T, start+T] mask, or None when plain causal attention is exact."""
        window = self.config.sliding_window
        s = start + t
        if key_mask is None and (window is None or s <= window) and (start == 0 or t == 1):
            return None
        slots = torch.arange(s, device=device)
        query_slots = slots[start:].unsqueeze(-1)
        mask = slots <= query_slots
        if window is not None:
            mask = mask & (query_slots - slots < window)
        mask = mask.view(1, 1, t, s)
        if key_mask is not None:
            # A padding query would see no key at all (NaN rows); let it see itself instead.
            mask = (mask & key_mask[:, None, None, :s]) | (slots == query_slots).view(1, 1, t, s)
        return mask
