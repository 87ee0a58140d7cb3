"""The one transformer that runs every family (read top to bottom).

Family differences are `ModelConfig` fields: the norm kind, how much of each head gets rotary and
whether it carries Alpha's xPos scaling, parallel or sequential residual, SwiGLU or GELU MLP, biases,
grouped-query attention, a sliding window and tied embeddings. Weights are stored fused (one qkv
projection, one gate+up projection) so a decode step runs few, large matmuls; `checkpoint.py` maps each
family's published layout onto these names.

Generation is `prefill` (a prompt, in chunks, into one row of a KV cache the caller owns) followed by
`decode` steps of one token per row; training and scoring run `forward` over whole sequences, no cache.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kataru import dispatch, kernels
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
    """nn.Linear with four CPU paths for bf16 and fp16 weights, chosen per call by `kataru.dispatch`:

    - "kernel" (and "kernel-avx512", its AVX-512 build): `kataru.kernels` streams the 16-bit weights once for
      all rows of a decode batch, where torch's time grows with every row on AVX2 without native bf16;
    - "packed" (bf16): the weight stored in panels of 16 rows (`kernels.pack_bf16`), which the kernel converts
      once for up to six rows and sums like a GEMM: faster from a few rows up to prompts; "packed-avx512" reads
      the same panels in the AVX-512 build, with AVX512-BF16 two products per lane and instruction, no
      conversion. A layer keeps one layout: once a plan runs the panels at every row count, `settle` drops
      the [out, in] copy (the other paths, `dense_weight` and the state dict unpack the panels);
    - "upcast": the float32 GEMM on the weight converted a tile at a time (`upcast_matmul`): on AVX2, prompts
      go 6x faster than torch's bf16 GEMM (a 512-token prefill of the llm-jp-3.1-1.8b shape measured 7 tok/s);
    - "torch": torch's own 16-bit matmul, which oneDNN runs on AMX or AVX512-BF16 where the CPU has them.

    The fixed rule (no plan, `KATARU_DISPATCH=kernels`): the kernel (AVX-512 where it runs) below `upcast_rows`
    rows, then upcast.
    """

    upcast_rows = 32
    paths = (*kernels.PATHS, *kernels.PACKED_PATHS, "upcast", "torch")
    packed: Tensor | None = None  # the weight in panels, made by the first "packed" call

    def forward(self, x: Tensor) -> Tensor:
        if x.device.type == "cpu" and x.dtype in kernels.HALF and self.weight.dtype == x.dtype:
            return self.run(dispatch.choose(self, x), x)
        return F.linear(x, self.dense_weight(), self.bias)

    @property
    def plan_kind(self) -> str | None:
        return {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(self.weight.dtype)

    @property
    def plan_shape(self) -> tuple[int, int]:
        return self.out_features, self.in_features

    @property
    def dense(self) -> bool:
        """Whether the [out, in] weight is here (else only the panels: `settle`)."""
        return self.weight.numel() > 0

    @property
    def can_pack(self) -> bool:
        return self.weight.dtype == torch.bfloat16 and kernels.panels_fit(self.out_features)

    def dense_weight(self) -> Tensor:
        return self.weight if self.dense or self.packed is None else kernels.unpack_bf16(self.packed)

    def packed_weight(self) -> Tensor:
        if self.packed is None:
            self.packed = kernels.pack_bf16(self.weight.detach())
        return self.packed

    def settle(self, paths: set[str], shared: bool) -> None:
        """Keep the layout the plan's `paths` read: only the panels when it runs packed paths alone (unless the
        weight is shared, as a tied output head's with the embeddings), else only [out, in]."""
        if paths and paths <= set(kernels.PACKED_PATHS) and not shared and self.dense and self.can_pack:
            self.packed_weight()
            self.weight = nn.Parameter(self.weight.new_empty(0), requires_grad=False)
        elif not paths & set(kernels.PACKED_PATHS) and self.dense:
            self.packed = None

    def can_run(self, path: str, x: Tensor) -> bool:
        if path in kernels.PACKED_PATHS:  # packs the weight the first time (before a plan times the path)
            isa = kernels.PACKED_PATHS[path]
            if (self.dense and not self.can_pack) or (torch.is_grad_enabled() and self.weight.requires_grad) or \
                    not kernels.available("linear", isa):
                return False
            return kernels.usable(x, self.packed_weight(), isa=isa)
        if path in kernels.PATHS:
            return self.dense and kernels.usable(x, self.weight, isa=kernels.PATHS[path])
        return True

    def run(self, path: str, x: Tensor) -> Tensor:
        if path in kernels.PACKED_PATHS:
            return kernels.linear_packed(x, self.packed_weight(), self.bias, kernels.PACKED_PATHS[path])
        if path in kernels.PATHS:
            return kernels.linear_half(x, self.weight, self.bias, kernels.PATHS[path])
        if path == "upcast":
            return upcast_matmul(x, self.dense_weight(), self.bias)
        return F.linear(x, self.dense_weight(), self.bias)

    def default_path(self, x: Tensor, rows: int) -> str:
        if not self.dense:  # (torch's matmul unpacks the panels per call: only where the kernels were switched off)
            return next((p for p in reversed(kernels.PACKED_PATHS) if self.can_run(p, x)), "torch")
        if rows >= self.upcast_rows:
            return "upcast"
        return kernels.best_path(x, self.weight) or "torch"

    def torch_path(self, x: Tensor, rows: int) -> str:
        return "torch"

    def reference_weight(self) -> Tensor:
        return self.dense_weight().detach().float()

    def _save_to_state_dict(self, destination: dict[str, Any], prefix: str, keep_vars: bool) -> None:
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if not self.dense:
            destination[prefix + "weight"] = self.dense_weight()


def weight_bytes(model: nn.Module) -> int:
    """Bytes of the model's weights as it holds them: parameters, and the panels of a `Linear` that keeps only
    those (its [out, in] parameter is then empty)."""
    panels = sum(m.packed.numel() * m.packed.element_size() for m in model.modules()
                 if isinstance(m, Linear) and not m.dense and m.packed is not None)
    return panels + sum(p.numel() * p.element_size() for p in model.parameters())


@contextmanager
def dense_weights(model: nn.Module) -> Iterator[None]:
    """Inside the block, every `Linear` that keeps only its panels holds [out, in] instead (for torch's paths,
    as `kataru bench` measures them), one layer at a time, so memory grows by one layer at most."""
    settled = [m for m in model.modules() if isinstance(m, Linear) and not m.dense]
    for m in settled:
        m.weight = nn.Parameter(m.dense_weight(), requires_grad=False)
        m.packed = None
    try:
        yield
    finally:
        for m in settled:
            m.settle({"packed"}, shared=False)


_upcast_scratch = threading.local()
_upcast = {"tile": 1 << 20}  # weight elements converted per GEMM call: 4 MB of float32, which stays in cache


@contextmanager
def upcast_tile(elements: int) -> Iterator[None]:
    """Convert `elements` weight elements per GEMM call in `upcast_matmul` inside the block (a huge number:
    whole weights), for experiments that compare tile sizes."""
    saved = _upcast["tile"]
    _upcast["tile"] = elements
    try:
        yield
    finally:
        _upcast["tile"] = saved


def upcast_buffer() -> Tensor | None:
    """This thread's buffer of converted weight rows (None before its first bf16 prefill)."""
    return getattr(_upcast_scratch, "buffer", None)


def upcast_matmul(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """x @ weight.T through the float32 GEMM, converting the 16-bit weight a tile of output rows at a time.

    Converting the whole weight first writes and reads back twice its 16-bit bytes in float32 through memory;
    a tile converted into a small buffer each thread keeps is still in cache when its GEMM reads it. On the
    llm-jp-3.1-1.8b shape a prefill is 1.36x faster at 64 tokens, 1.16x at 128 and even at 512
    (`bench/ab_switch.py upcast`). Where autograd needs the matmul, the whole weight is converted.
    """
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, weight, bias)):
        return F.linear(x.float(), weight.float(), None if bias is None else bias.float()).to(x.dtype)
    n, k = weight.shape
    rows = min(n, max(8, _upcast["tile"] // k))
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


class KVCache:
    """Keys and values of every layer for `rows` sequences of up to `slots` tokens each.

    k[layer] and v[layer] are [rows, kv_heads, slots, head_dim], zero-filled (a masked slot must never hold
    NaN, which a zero attention weight would still spread), one tensor per layer so that a compiled step
    writes each as a whole input rather than a view of one. The cache belongs to whoever schedules requests
    (the engine): it decides which row a sequence takes and passes the cache into `Transformer.prefill` and
    `Transformer.decode`, which only write and read the slots the call names. The model holds no cache.
    """

    def __init__(self, config: ModelConfig, rows: int, slots: int, dtype: torch.dtype,
                 device: torch.device | str | None = None) -> None:
        shape = (rows, config.n_kv_head, slots, config.head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(config.n_layer)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(config.n_layer)]

    @property
    def rows(self) -> int:
        return self.k[0].shape[0]

    @property
    def slots(self) -> int:
        return self.k[0].shape[2]

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (*self.k, *self.v))

    def layer(self, i: int) -> tuple[Tensor, Tensor]:
        return self.k[i], self.v[i]

    def resized(self, config: ModelConfig, rows: int, slots: int, moves: dict[int, int]) -> KVCache:
        """A cache of the new shape holding, in row `moves[r]`, what row r holds (up to the shorter length)."""
        new = KVCache(config, rows, slots, self.k[0].dtype, self.k[0].device)
        keep = min(slots, self.slots)
        for old_tensors, new_tensors in ((self.k, new.k), (self.v, new.v)):
            for old, target in zip(old_tensors, new_tensors, strict=True):
                for source_row, row in moves.items():
                    target[row, :, :keep] = old[source_row, :, :keep]
        return new


@dataclass(frozen=True)
class Prefill:
    """Tokens [1, T] of one sequence fill slots [start, start + T) of cache row `row`, after the `start`
    slots the row already holds (a chunk of a prompt, or the rest of one whose prefix is cached)."""

    row: int
    start: int


@dataclass(frozen=True)
class Decode:
    """One token per batch row: row b's token goes to slot slots[b] (also its position) of cache row
    rows[b] and attends that row's slots up to it; `span` > max(slots) bounds the slots any row reads."""

    rows: Tensor
    slots: Tensor
    span: int


def write_and_read(cache: tuple[Tensor, Tensor], k: Tensor, v: Tensor, at: Prefill | Decode) -> tuple[Tensor,
                                                                                                       Tensor]:
    """Write the new keys and values [B, H, T, D] where `at` says; return the keys and values they attend."""
    k_cache, v_cache = cache
    if isinstance(at, Prefill):
        end = at.start + k.shape[2]
        k_cache[at.row, :, at.start:end] = k[0]
        v_cache[at.row, :, at.start:end] = v[0]
        return k_cache[at.row:at.row + 1, :, :end], v_cache[at.row:at.row + 1, :, :end]
    k_cache[at.rows, :, at.slots] = k[:, :, 0]
    v_cache[at.rows, :, at.slots] = v[:, :, 0]
    return k_cache[at.rows, :, :at.span], v_cache[at.rows, :, :at.span]


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        rows = x.numel() // x.shape[-1]
        if rows < Linear.upcast_rows and kernels.norm_applicable(x, self.weight) and dispatch.step_path(
                "norm", x.dtype, rows) == "kernel":
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

    def forward(self, x: Tensor, rope: Tensor, mask: Tensor | None, cache: tuple[Tensor, Tensor] | None = None,
                at: Prefill | Decode | None = None) -> Tensor:
        return self.wo(self.attend(self.wqkv(x), rope, mask, cache, at))

    def attend(self, qkv: Tensor, rope: Tensor, mask: Tensor | None, cache: tuple[Tensor, Tensor] | None = None,
               at: Prefill | Decode | None = None) -> Tensor:
        """The heads' outputs [B, T, q_size] (before `wo`) for the fused projection's qkv [B, T, ...]."""
        c = self.config
        b, t, _ = qkv.shape
        if (isinstance(at, Decode) and cache is not None
                and kernels.attention_applicable(cache[0], qkv.dtype, c.head_dim)
                and dispatch.step_path("attention", qkv.dtype, b) == "kernel"):
            # One kernel call splits qkv, rotates, writes the row's new key and value at its slot and
            # attends over the row's slots in place (no gathered copy of the cache).
            tables = rope.view(4, b, -1) if c.rotary_dim else None
            y = kernels.decode_attention(qkv.view(b, -1), tables, cache[0], cache[1], at.rows, at.slots, c.n_head,
                                         c.sliding_window)
            return y.view(b, 1, -1)
        q, k, v = qkv.split([c.q_size, c.kv_size, c.kv_size], dim=-1)
        q = q.view(b, t, c.n_head, c.head_dim).transpose(1, 2)
        k = k.view(b, t, c.n_kv_head, c.head_dim).transpose(1, 2)
        v = v.view(b, t, c.n_kv_head, c.head_dim).transpose(1, 2)
        if c.rotary_dim:
            q = apply_rotary(q, rope[0], rope[1])
            k = apply_rotary(k, rope[2], rope[3])
        if cache is not None and at is not None:
            k, v = write_and_read(cache, k, v, at)
        gqa = c.n_kv_head != c.n_head
        if isinstance(at, Decode) and b > 1 and mask is not None and dispatch.pinned_alone() and q.device.type == "cpu":
            # Rows of one sequence (speculation) computed as its decode steps: each over its own slots, since
            # SDPA over a longer, masked span rounds otherwise.
            ends = (at.slots + 1).tolist()
            y = torch.cat([F.scaled_dot_product_attention(q[i:i + 1], k[i:i + 1, :, :end], v[i:i + 1, :, :end],
                                                          attn_mask=mask[i:i + 1, ..., :end], enable_gqa=gqa)
                           for i, end in enumerate(ends)])
        elif mask is None:  # a fresh causal sequence, or one token over every slot before it
            y = F.scaled_dot_product_attention(q, k, v, is_causal=t > 1, enable_gqa=gqa)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)
        return y.transpose(1, 2).reshape(b, t, c.q_size)


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

    def forward(self, x: Tensor, rope: Tensor, mask: Tensor | None, cache: tuple[Tensor, Tensor] | None = None,
                at: Prefill | Decode | None = None) -> Tensor:
        """sequential (LLaMA, Mistral, StableLM, rinna):  x = x + attn(norm1 x);  x = x + mlp(norm2 x)
        parallel (Alpha, NeoX with use_parallel_residual):  x = x + attn(norm1 x) + mlp(norm2 x)"""
        h = self.attention(self.attention_norm(x), rope, mask, cache, at)
        if self.parallel:
            return x + h + self.feed_forward(self.ffn_norm(x))
        x = x + h
        return x + self.feed_forward(self.ffn_norm(x))

    def mixed(self, xs: list[Tensor], ropes: list[Tensor], masks: list[Tensor | None], cache: tuple[Tensor, Tensor],
              ats: list[Prefill | Decode]) -> list[Tensor]:
        """`forward` for parts of a step (a prompt chunk, decode rows), each on its own rope, mask and cache
        slots: the matmuls once over the rows of all parts, the norms and the attention per part."""
        a = self.attention
        qkv = joint(a.wqkv, [self.attention_norm(x) for x in xs])
        h = joint(a.wo, [a.attend(*part) for part in zip(qkv, ropes, masks, [cache] * len(xs), ats, strict=True)])
        if self.parallel:
            ff = joint(self.feed_forward, [self.ffn_norm(x) for x in xs])
            return [x + hi + f for x, hi, f in zip(xs, h, ff, strict=True)]
        xs = [x + hi for x, hi in zip(xs, h, strict=True)]
        return [x + f for x, f in zip(xs, joint(self.feed_forward, [self.ffn_norm(x) for x in xs]), strict=True)]


def joint(fn: Callable[[Tensor], Tensor], parts: list[Tensor]) -> list[Tensor]:
    """fn (row by row: linear layers, the MLP) on the rows of all parts at once, split back into their shapes."""
    flat = torch.cat([p.reshape(-1, p.shape[-1]) for p in parts])
    out = fn(flat).split([p.numel() // p.shape[-1] for p in parts])
    return [o.view(*p.shape[:-1], o.shape[-1]) for o, p in zip(out, parts, strict=True)]


class Transformer(nn.Module):
    """Three ways in, one stack of blocks:

        forward(tokens)                             whole sequences from position 0, no cache (training, scoring)
        prefill(tokens, cache, row, start)          one sequence's tokens into cache row `row` from slot `start`
        decode(tokens, cache, rows, slots, span)    one token per row, each at its own slot of its own row

    A cache row holds one sequence: slot s holds the key and value of its token at position s, so a row's
    slots are its positions, and rows of one decode batch may hold sequences of any length.
    """

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

    @classmethod
    def empty(cls, config: ModelConfig, dtype: torch.dtype | None = None) -> Transformer:
        """The structure on the meta device with no initialiser run (every tensor is filled afterwards) and
        its rotary tables built for real on the default device."""
        with torch.device("meta"), skip_init():
            model = cls(config)
        if dtype is not None:
            model = model.to(dtype)
        model.rotary = Rotary(config)
        return model

    def new_cache(self, rows: int, slots: int) -> KVCache:
        """An empty KV cache for this model's dtype and device."""
        weight = self.tok_embeddings.weight
        return KVCache(self.config, rows, slots, weight.dtype, weight.device)

    def forward(self, tokens: Tensor, last_only: bool = False) -> Tensor:
        """Logits [B, T, V] of sequences [B, T] that start at position 0 ([B, 1, V] with last_only)."""
        b, t = tokens.shape
        positions = torch.arange(t, device=tokens.device).expand(b, t)
        return self._logits(tokens, positions, self.attention_mask(t, 0, tokens.device), None, None, last_only)

    def prefill(self, tokens: Tensor, cache: KVCache, row: int, start: int) -> Tensor:
        """Logits [1, V] after tokens [1, T], which fill slots [start, start + T) of cache row `row`."""
        t = tokens.shape[1]
        positions = torch.arange(start, start + t, device=tokens.device).unsqueeze(0)
        mask = self.attention_mask(t, start, tokens.device)
        return self._logits(tokens, positions, mask, cache, Prefill(row, start), True)[:, -1]

    def decode(self, tokens: Tensor, cache: KVCache, rows: Tensor, slots: Tensor, span: int) -> Tensor:
        """Logits [B, V] after tokens [B, 1], token b at slot slots[b] of cache row rows[b].

        span > max(slots) is the number of slots the batch reads, passed in so that no layer waits on the
        device to learn it; a larger span (a CUDA graph's bucket) gives the same logits under the row mask.
        """
        return self._logits(tokens, slots.unsqueeze(1), self.row_mask(slots, span), cache, Decode(rows, slots, span),
                            False)[:, -1]

    def mixed(self, chunk: Tensor, row: int, start: int, tokens: Tensor, cache: KVCache, rows: Tensor, slots: Tensor,
              span: int) -> tuple[Tensor, Tensor]:
        """`prefill(chunk, cache, row, start)` and `decode(tokens, cache, rows, slots, span)` in one pass, so that
        a step with a prompt chunk reads the weights once, not twice: every matmul runs once over the chunk's
        and the decode rows, the norms and the attention on each part as its own call would. The same logits,
        ([1, V], [B, V]), when every matmul gives a row the same bits at any row count
        (`dispatch.row_invariant`), as kataru's kernels do."""
        t = chunk.shape[1]
        xs = [self.tok_embeddings(chunk), self.tok_embeddings(tokens)]
        positions = torch.arange(start, start + t, device=chunk.device).unsqueeze(0)
        ropes = [self.rotary(positions, xs[0].dtype), self.rotary(slots.unsqueeze(1), xs[1].dtype)]
        masks = [self.attention_mask(t, start, chunk.device), self.row_mask(slots, span)]
        ats: list[Prefill | Decode] = [Prefill(row, start), Decode(rows, slots, span)]
        for i, layer in enumerate(self.layers):
            xs = layer.mixed(xs, ropes, masks, cache.layer(i), ats)
        last, decoded = joint(self.output, [self.norm(xs[0][:, -1:]), self.norm(xs[1])])
        return last[:, -1], decoded[:, -1]

    def _logits(self, tokens: Tensor, positions: Tensor, mask: Tensor | None, cache: KVCache | None,
                at: Prefill | Decode | None, last_only: bool) -> Tensor:
        x = self.tok_embeddings(tokens)
        rope = self.rotary(positions, x.dtype)
        for i, layer in enumerate(self.layers):
            x = layer(x, rope, mask, None if cache is None else cache.layer(i), at)
        if last_only:
            x = x[:, -1:]
        return self.output(self.norm(x))

    def decode_probe(self, rows: int, context: int = 256) -> Callable[[], Tensor]:
        """One block's decode step for `rows` rows over `context` cached tokens (random keys and values): what
        `kataru.dispatch` times the attention and norm paths on, without a whole model's cache."""
        c, weight = self.config, self.tok_embeddings.weight
        context = min(context, c.max_seq_len - 1)
        g = torch.Generator().manual_seed(0)
        shape = (rows, c.n_kv_head, context + 1, c.head_dim)
        cache = tuple(torch.randn(shape, generator=g).to(weight.dtype) for _ in range(2))
        x = torch.randn(rows, 1, c.dim, generator=g).to(weight.dtype)
        slots = torch.full((rows,), context)
        at = Decode(torch.arange(rows), slots, context + 1)
        rope = self.rotary(slots.unsqueeze(1), weight.dtype)
        mask = self.row_mask(slots, context + 1)
        return lambda: self.layers[0](x, rope, mask, cache, at)

    def row_mask(self, slots: Tensor, span: int) -> Tensor:
        """[B, 1, 1, span]: each row's query at slots[b] sees its own filled slots (and the window)."""
        keys = torch.arange(span, device=slots.device)
        mask = keys.unsqueeze(0) <= slots.unsqueeze(1)
        if self.config.sliding_window is not None:
            mask = mask & (slots.unsqueeze(1) - keys.unsqueeze(0) < self.config.sliding_window)
        return mask[:, None, None, :]

    def attention_mask(self, t: int, start: int, device: torch.device) -> Tensor | None:
        """Boolean [1, 1, T, start+T] mask of T queries at slots [start, start+T), or None when plain causal
        attention (or one query over every slot) is exact."""
        window = self.config.sliding_window
        s = start + t
        if (window is None or s <= window) and (start == 0 or t == 1):
            return None
        slots = torch.arange(s, device=device)
        query_slots = slots[start:].unsqueeze(-1)
        mask = slots <= query_slots
        if window is not None:
            mask = mask & (query_slots - slots < window)
        return mask.view(1, 1, t, s)


@contextmanager
def skip_init() -> Iterator[None]:
    """Build modules without running their weight initialisers (every tensor is overwritten anyway).

    On the meta device torch's initialisers import torch._dynamo: over a second of start-up for nothing.
    """
    names = ("normal_", "uniform_", "kaiming_uniform_", "zeros_", "ones_", "trunc_normal_")
    saved = {name: getattr(torch.nn.init, name) for name in names}
    for name in names:
        setattr(torch.nn.init, name, lambda tensor, *args, **kwargs: tensor)
    try:
        yield
    finally:
        for name, fn in saved.items():
            setattr(torch.nn.init, name, fn)
