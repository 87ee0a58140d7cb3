"""The decode kernels (bf16, int8, int4): error bounds against float64, the same bits at every batch size,
fallbacks."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from kataru import kernels
from kataru import model as kataru_model
from kataru.model import Linear, RMSNorm
from kataru.quantize import Int4Linear, Int8Linear

needs_kernel = pytest.mark.skipif(not kernels.available(),
                                  reason="no C compiler, no AVX2 or KATARU_KERNELS=0: kataru uses torch's matmul here")


def operands(rows: int, k: int, n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, k, generator=g).bfloat16()
    w = (torch.randn(n, k, generator=g) * 0.1).bfloat16()
    b = torch.randn(n, generator=g).bfloat16()
    return x, w, b


@needs_kernel
@pytest.mark.parametrize("k,n", [(256, 96), (70, 37), (5, 3)])  # k % 8 tails, odd n, k below one vector
@pytest.mark.parametrize("rows", [1, 2, 3, 4, 5, 8, 9, 17])
@pytest.mark.parametrize("dtype,rounding", [(torch.bfloat16, 2**-8), (torch.float16, 2**-11)])
def test_error_is_within_float32_accumulation_and_one_rounding(rows: int, k: int, n: int, dtype: torch.dtype,
                                                               rounding: float) -> None:
    """Summing k products in float32 errs by at most k * 2^-24 * sum|x w| (plus one more term for the bias);
    rounding the result to bf16 adds at most 2^-8 of its size, to fp16 2^-11 (weights and inputs in fp16 go
    through the same float32 sums)."""
    x, w, b = (t.to(dtype) for t in operands(rows, k, n))
    exact = x.double() @ w.double().t() + b.double()
    got = kernels.linear_half(x, w, b)
    assert got.dtype == dtype and got.shape == (rows, n)
    bound = rounding * exact.abs() + (k + 1) * 2**-24 * (x.double().abs() @ w.double().abs().t() + b.double().abs())
    assert ((got.double() - exact).abs() <= bound * 1.01).all()


@needs_kernel
@pytest.mark.parametrize("k,n", [(256, 96), (70, 32), (5, 16), (1100, 48)])  # k past the kernel's 512-step chunks
@pytest.mark.parametrize("rows", [1, 2, 3, 4, 5, 7, 8, 13, 17])  # groups of up to six rows, one or two panels
def test_packed_bf16_is_within_float32_accumulation_and_one_rounding(rows: int, k: int, n: int) -> None:
    """The packed layout's kernel (a GEMM: each output one chain of k FMAs) keeps linear_half's bound."""
    x, w, b = operands(rows, k, n)
    packed = kernels.pack_bf16(w)
    assert packed.shape == (n // 16, k, 16) and torch.equal(kernels.unpack_bf16(packed), w)
    assert torch.equal(packed[0, 3, 2:4], torch.stack([w[1, 3], w[9, 3]]))  # rows i and i + 8 share a lane
    exact = x.double() @ w.double().t() + b.double()
    got = kernels.linear_packed(x, packed, b)
    assert got.dtype == torch.bfloat16 and got.shape == (rows, n)
    bound = 2**-8 * exact.abs() + (k + 1) * 2**-24 * (x.double().abs() @ w.double().abs().t() + b.double().abs())
    assert ((got.double() - exact).abs() <= bound * 1.01).all()
    assert not torch.equal(kernels.linear_packed(x, kernels.pack_bf16(w.roll(1, 0)), b), got)  # the check bites


def int8_operands(rows: int, k: int, n: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    x, w, b = operands(rows, k, n)
    q = torch.randint(-127, 128, (n, k), generator=torch.Generator().manual_seed(1), dtype=torch.int8)
    scales = w.float().abs().amax(dim=1) / 127
    return x, q, scales, b


def input_half_steps(x: torch.Tensor) -> torch.Tensor:
    """[rows, k]: half the int8 step of each input's block of 64 (max|x_block| / 127 / 2)."""
    rows, k = x.shape
    pad = (-k) % 64
    blocks = F.pad(x.double().abs(), (0, pad)).reshape(rows, -1, 64)
    return (blocks.amax(-1, keepdim=True) / 127 / 2).expand_as(blocks).reshape(rows, -1)[:, :k]


def quantized_bound(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor, exact: torch.Tensor) -> torch.Tensor:
    """The kernels' error bound against x @ w.T + b in float64, for a dequantized weight w.

    Each input becomes an int8 step of its block, off by at most half a step h, which moves the sum by at
    most sum h|w|. The integer block sums are exact (at most 64 * 127 * 127 < 2^24, so also as float32);
    scaling them, adding them up, the row scale and the bias are at most k + 6 float32 roundings of
    sum (|x| + h)|w|; the result is rounded once to bf16 (2^-8)."""
    k = x.shape[1]
    h = input_half_steps(x)
    quantization = h @ w.abs().t()
    rounding = (k + 6) * 2**-24 * ((x.double().abs() + h) @ w.abs().t() + b.double().abs())
    return 2**-8 * exact.abs() + quantization + rounding


@needs_kernel
@pytest.mark.parametrize("k,n,tiled", [(256, 96, False), (70, 37, False), (5, 3, False), (4096 + 24, 40, False),
                                       (256, 96, True), (4096, 40, True), (64, 8, True)])  # partial last blocks, odd n
@pytest.mark.parametrize("rows", [1, 2, 5, 8, 17])
def test_int8_error_is_within_input_quantization_and_float32_rounding(rows: int, k: int, n: int, tiled: bool) -> None:
    x, q, scales, b = int8_operands(rows, k, n)
    w = q.double() * scales.double()[:, None]
    exact = x.double() @ w.t() + b.double()
    got = kernels.linear_int8(x, kernels.tile_int8(q) if tiled else q, scales, b, tiled=tiled)
    assert got.dtype == torch.bfloat16 and got.shape == (rows, n)
    assert ((got.double() - exact).abs() <= quantized_bound(x, w, b, exact) * 1.01).all()


def int4_operands(rows: int, k: int, n: int, group: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor,
                                                                   torch.Tensor, torch.Tensor]:
    """x, packed weights, scale_min, bias, and the float64 weight they stand for."""
    x, _, b = operands(rows, k, n)
    g = torch.Generator().manual_seed(2)
    q = torch.randint(0, 16, (n, k), generator=g)
    scales = (torch.rand(n, k // group, generator=g) * 0.02).bfloat16()
    mins = (-torch.rand(n, k // group, generator=g) * 0.15).bfloat16()
    w = q.double() * scales.double().repeat_interleave(group, 1) + mins.double().repeat_interleave(group, 1)
    return x, kernels.pack_int4(q), kernels.int4_scale_min(scales, mins), b, w


@needs_kernel
@pytest.mark.parametrize("k,n,group", [(256, 96, 64), (512, 32, 128), (64, 8, 64), (4096, 40, 256)])
@pytest.mark.parametrize("rows", [1, 2, 5, 8, 17])
def test_int4_error_is_within_input_quantization_and_float32_rounding(rows: int, k: int, n: int, group: int) -> None:
    """As for int8; the groups' minimum meets the float32 sum of each input block (k more roundings at most)."""
    x, packed, scale_min, b, w = int4_operands(rows, k, n, group)
    exact = x.double() @ w.t() + b.double()
    got = kernels.linear_int4(x, packed, scale_min, group, b)
    assert got.dtype == torch.bfloat16 and got.shape == (rows, n)
    assert ((got.double() - exact).abs() <= quantized_bound(x, w, b, exact) * 1.01).all()


def test_int8_tiling_round_trips() -> None:
    q = torch.randint(-127, 128, (16, 128), dtype=torch.int8)
    tiled = kernels.tile_int8(q)
    assert tiled.shape == (2, 1024)
    assert int(tiled[1, 32 * 3 + 4 * 6 + 2]) == int(q[8 + 6, 12 + 2])  # byte 4r + j of step s: row r, value 4s + j
    assert torch.equal(kernels.untile_int8(tiled), q)


def test_int4_packing_round_trips() -> None:
    q = torch.randint(0, 16, (16, 192), dtype=torch.uint8)
    packed = kernels.pack_int4(q)
    assert packed.shape == (2, 768) and packed.dtype == torch.uint8
    # byte 4r + j of step s: row r's values 8s + j (low nibble) and 8s + 4 + j (high nibble), tile by tile
    assert int(packed[0, 4 * 3 + 1]) == int(q[3, 1]) | int(q[3, 5]) << 4
    assert int(packed[1, 32 * 2 + 4 * 5 + 2]) == int(q[8 + 5, 16 + 2]) | int(q[8 + 5, 16 + 6]) << 4
    assert torch.equal(kernels.unpack_int4(packed), q)


@needs_kernel
def test_integer_sums_are_exact_at_the_extremes() -> None:
    """Every product at its largest over a long row, in both signs: a saturating or overflowing integer
    step (vpmaddubsw adds pairs in int16) would show as a wrong sum."""
    k = 16384
    x = torch.full((2, k), 3.0).bfloat16()
    x[1] = -3.0
    q = torch.full((4, k), 127, dtype=torch.int8)
    q[1] = -127
    for tiled in (False, True):
        q8 = torch.cat((q, q)) if tiled else q
        got = kernels.linear_int8(x, kernels.tile_int8(q8) if tiled else q8, torch.full((len(q8),), 0.01),
                                  tiled=tiled).double()
        assert torch.allclose(got, x.double() @ (q8.double() * 0.01).t(), rtol=2**-8, atol=0)
    q4 = torch.full((8, k), 15, dtype=torch.uint8)
    q4[1] = 0
    scale_min = kernels.int4_scale_min(torch.full((8, k // 64), 0.01), torch.full((8, k // 64), -0.05))
    w = q4.double() * scale_min[0, 0, 0, 0].double() + scale_min[0, 0, 1, 0].double()
    got = kernels.linear_int4(x, kernels.pack_int4(q4), scale_min, 64).double()
    assert torch.allclose(got, x.double() @ w.t(), rtol=2**-8, atol=0)


@needs_kernel
def test_a_row_gets_the_same_bits_alone_and_in_any_batch() -> None:
    """The engine's greedy results must not depend on what else is in the batch."""
    x, w, _ = operands(40, 2048 + 24, 301)  # 40 rows: the input is quantized and widened by several threads
    _, q, scales, _ = int8_operands(40, 2048 + 24, 301)
    _, packed, scale_min, _, _ = int4_operands(40, 2048, 304, 64)
    tiled = kernels.tile_int8(q[:296, :2048])
    panels = kernels.pack_bf16(w[:288])
    for fn in (lambda rows: kernels.linear_half(rows, w), lambda rows: kernels.linear_half(rows, w.half()),
               lambda rows: kernels.linear_packed(rows, panels),
               lambda rows: kernels.linear_int8(rows, q, scales),
               lambda rows: kernels.linear_int8(rows[:, :2048], tiled, scales[:296], tiled=True),
               lambda rows: kernels.linear_int4(rows[:, :2048], packed, scale_min, 64)):
        alone = torch.cat([fn(x[i:i + 1]) for i in range(40)])
        for rows in (2, 3, 4, 5, 8, 17, 40):
            assert torch.equal(fn(x[:rows]), alone[:rows])


@needs_kernel
def test_activations_in_any_type_get_the_same_sums_rounded_once() -> None:
    """Each kernel reads bf16 or float32 inputs and biases and writes the activation type: the float32 call
    with the same values gives the same float32 sums, so the bf16 result is exactly its one rounding. Other
    types (float16) go through float32."""
    x, w, b = operands(3, 2048, 304)
    _, q, scales, _ = int8_operands(3, 2048, 304)
    _, packed, scale_min, _, _ = int4_operands(3, 2048, 304, 64)
    tiled = kernels.tile_int8(q)
    panels = kernels.pack_bf16(w)
    for fn in (lambda rows, bias: kernels.linear_half(rows, w, bias),
               lambda rows, bias: kernels.linear_packed(rows, panels, bias),
               lambda rows, bias: kernels.linear_int8(rows, q, scales, bias),
               lambda rows, bias: kernels.linear_int8(rows, tiled, scales, bias, tiled=True),
               lambda rows, bias: kernels.linear_int4(rows, packed, scale_min, 64, bias)):
        for bias in (None, b):
            wide = fn(x.float(), None if bias is None else bias.float())
            assert wide.dtype == torch.float32 and torch.equal(fn(x, bias), wide.bfloat16())
            half = fn(x.half(), None if bias is None else bias.half())
            assert half.dtype == torch.float16 and torch.equal(half, wide.half())


@needs_kernel
def test_linear_uses_the_kernel_for_decode_rows_only_without_gradients(monkeypatch: pytest.MonkeyPatch) -> None:
    torch.manual_seed(0)
    linear = Linear(64, 48).bfloat16().requires_grad_(False)
    x = torch.randn(3, 64).bfloat16()
    assert torch.equal(linear(x), kernels.linear_half(x, linear.weight, linear.bias))
    with kernels.disabled():
        assert kernels.library() is None
        assert torch.equal(linear(x), F.linear(x, linear.weight, linear.bias))
    assert kernels.available()
    trainable = Linear(64, 48).bfloat16()
    assert torch.equal(trainable(x), F.linear(x, trainable.weight, trainable.bias))  # autograd needs torch's op
    many = torch.randn(Linear.upcast_rows, 64).bfloat16()  # prefill rows take the float32 GEMM
    expected = F.linear(many.float(), linear.weight.float(), linear.bias.float()).bfloat16()
    assert torch.equal(linear(many), expected)
    half = Linear(64, 48).half().requires_grad_(False)  # fp16 weights (checkpoints saved in fp16) take both paths
    calls: list[int] = []
    kernel = kernels.linear_half
    monkeypatch.setattr(kernels, "linear_half", lambda rows, *args: calls.append(len(rows)) or kernel(rows, *args))
    for rows in (x.half(), many.half()):
        expected = F.linear(rows.float(), half.weight.float(), half.bias.float()).half()
        assert torch.equal(half(rows), expected)
    assert calls == [3]  # the decode rows on the kernel; the prefill rows on the float32 GEMM


def run_in_new_thread(fn):  # type: ignore[no-untyped-def]
    """fn's result in a fresh thread (thread-local state starts empty; exceptions come back)."""
    out: dict = {}

    def target() -> None:
        try:
            out["value"] = fn()
        except BaseException as err:
            out["error"] = err

    thread = threading.Thread(target=target)
    thread.start()
    thread.join()
    if "error" in out:
        raise out["error"]
    return out["value"]


def test_prefill_converts_weight_tiles_into_a_buffer_kept_per_thread_and_never_under_autograd() -> None:
    torch.manual_seed(0)
    small, large = Linear(64, 48).bfloat16(), Linear(64, 96).bfloat16()
    headless = Linear(64, 96, bias=False).bfloat16()
    x = torch.randn(2, Linear.upcast_rows, 64).bfloat16()

    def prefills() -> None:
        assert kataru_model.upcast_buffer() is None  # a new thread: no buffer yet
        with torch.inference_mode():  # the buffer made in inference mode (generation) ...
            large(x)
        first = kataru_model.upcast_buffer()
        assert first is not None and first.numel() == 10 * 64  # one tile, not the weight
        with torch.no_grad():  # ... serves plain no_grad code too
            for layer in (small, large, headless):
                bias = None if layer.bias is None else layer.bias.float()
                expected = F.linear(x.float(), layer.weight.float(), bias)
                got = layer(x)
                assert got.shape == (2, Linear.upcast_rows, layer.out_features) and got.is_contiguous()
                # the float32 result rounded once to bf16: within one rounding step of the exact product
                assert ((got.float() - expected).abs() <= expected.abs() * 2**-8 + 1e-6).all()
        assert kataru_model.upcast_buffer() is first  # the same memory, reused

        def other() -> int:
            with torch.no_grad():  # grad mode is per thread
                small(x)
            return kataru_model.upcast_buffer().data_ptr()

        assert run_in_new_thread(other) != first.data_ptr()  # threads never share the buffer (first is alive)

    with kataru_model.upcast_tile(640):  # 10 rows of 64: 96 rows are 9 whole tiles and one of 6
        run_in_new_thread(prefills)
    # with autograd the whole weight is converted and kept for backward: the right gradients
    leaf = x.float().requires_grad_(True)
    small(leaf.bfloat16()).float().sum().backward()
    assert small.weight.grad is not None and leaf.grad is not None
    assert torch.allclose(leaf.grad, small.weight.float().sum(0).expand_as(leaf), rtol=2**-7, atol=1e-3)


def test_without_a_compiler_torch_matmul_takes_over(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(kernels, "_state", {"lib": {}, "off": dict.fromkeys(kernels.KINDS, 0), "stub": 0})
    monkeypatch.setenv("KATARU_CACHE", str(tmp_path))
    monkeypatch.setenv("CC", "/nonexistent/cc")
    assert kernels.library() is None
    assert list(tmp_path.rglob("*.so")) == []
    torch.manual_seed(0)
    linear = Linear(64, 48).bfloat16().requires_grad_(False)
    x = torch.randn(2, 64).bfloat16()
    assert torch.equal(linear(x), F.linear(x, linear.weight, linear.bias))


def test_switched_off_by_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(kernels, "_state", {"lib": {}, "off": dict.fromkeys(kernels.KINDS, 0), "stub": 0})
    monkeypatch.setenv("KATARU_KERNELS", "0")
    assert not kernels.supported() and kernels.library() is None


@needs_kernel
def test_a_build_is_cached_and_leaves_no_temp_files(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("KATARU_CACHE", str(tmp_path))
    first = kernels.build()
    stamp = first.stat().st_mtime_ns
    assert kernels.build() == first and first.stat().st_mtime_ns == stamp  # not compiled again
    assert [p.name for p in first.parent.iterdir()] == [first.name]


@needs_kernel
@pytest.mark.parametrize("method", ["int8", "int4"])
def test_quantized_prefill_takes_the_decode_kernels_and_autograd_the_dequantized_weights(method: str) -> None:
    """A prompt's rows get the bits each gets alone (so prefill and decode agree); where autograd needs the
    matmul, torch multiplies the dequantized weights."""
    torch.manual_seed(0)
    linear = torch.nn.Linear(256, 96).bfloat16()
    module = Int8Linear.from_linear(linear) if method == "int8" else Int4Linear.from_linear(linear)
    weight = (module.plain_weight().float() * module.scales.float()[:, None] if method == "int8"
              else module.dequantize())
    x = torch.randn(Linear.upcast_rows + 8, 256).bfloat16()
    alone = torch.cat([module(row[None]) for row in x])
    assert torch.equal(module(x), alone)
    x.requires_grad_(True)
    y = module(x)
    assert torch.equal(y, F.linear(x.float(), weight, linear.bias.float()).bfloat16())
    y.float().sum().backward()
    assert torch.allclose(x.grad.float(), weight.sum(0).expand(len(x), -1), rtol=2**-7, atol=1e-3)


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rms_norm_differs_from_torchs_only_by_the_order_of_one_sum(dtype: torch.dtype) -> None:
    """The kernel sums the squares in another order than torch. Both sums of d positive terms lie within
    d * 2^-24 (relative) of the exact one, and 1/sqrt halves that, so float32 results agree within d * 2^-24
    plus a few roundings; in bf16 that moves an element by one rounding step (2^-8), and only rarely."""
    torch.manual_seed(0)
    d = 2048 + 3  # a tail past the last vector
    norm = RMSNorm(d, 1e-5).to(dtype)
    with torch.no_grad():
        norm.weight.normal_(1, 0.1)
    x = (torch.randn(5, 1, d) * 3).to(dtype)
    with torch.no_grad():
        got = norm(x)  # a decode step's rows: the kernel
        with kernels.disabled():
            expected = norm(x)
        many = torch.randn(Linear.upcast_rows, d).to(dtype)
        with kernels.disabled():
            by_torch = norm(many)
        assert torch.equal(norm(many), by_torch)  # a prompt's rows: torch's ops
    assert got.dtype == dtype and got.shape == x.shape
    error = (got.double() - expected.double()).abs()
    if dtype == torch.float32:
        assert (error <= expected.double().abs() * (d + 4) * 2**-24).all()
    else:
        assert (error <= expected.double().abs() * 2**-8).all()
        assert (got != expected).double().mean() < 0.01
    trainable = norm.float().requires_grad_(True)  # autograd needs torch's ops
    assert trainable(x.float()).grad_fn is not None


def reference_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rows: torch.Tensor, slots: torch.Tensor,
                        window: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """float64 attention of each row's query over its visible slots, and each (row, head)'s max|v|."""
    heads, group = q.shape[1], q.shape[1] // k.shape[1]
    out, vmax = [], []
    for b in range(q.shape[0]):
        first = 0 if window is None else max(0, int(slots[b]) - window + 1)
        kb = k[rows[b], :, first:int(slots[b]) + 1].double().repeat_interleave(group, 0)
        vb = v[rows[b], :, first:int(slots[b]) + 1].double().repeat_interleave(group, 0)
        scores = (q[b].double()[:, None, :] @ kb.transpose(-1, -2))[:, 0] / q.shape[-1] ** 0.5
        out.append((scores.softmax(-1)[:, None, :] @ vb)[:, 0])
        vmax.append(vb.abs().amax(dim=(1, 2)).reshape(heads, 1))
    return torch.stack(out), torch.stack(vmax)


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("heads,kv_heads,dim,rot,window", [(4, 4, 16, 16, None), (8, 2, 80, 20, None),
                                                           (4, 2, 64, 64, 5), (2, 1, 128, 0, None),
                                                           (2, 2, 24, 8, None)])
def test_decode_attention_is_within_float32_rounding(dtype: torch.dtype, heads: int, kv_heads: int, dim: int,
                                                     rot: int, window: int | None) -> None:
    """One decode step from the fused projection: keys rotated (all, part or none of each head; xPos-like
    separate query and key tables) and written with the values at each row's own slot, bit for bit as torch's
    ops do; then each query over its row's slots up to its own (slot 0 sees one key), GQA, a window. Head
    sizes that are and are not a multiple of 16 (bf16 read in pairs or eight at a time), rotary halves of 8
    values and of other counts (rotated eight at a time or one by one).

    A score errs by at most dim float32 roundings of sum|q k| / sqrt(dim) (call it e); exp's polynomial adds
    2e-7 relative, so every weight is off by a relative e + 3e-7 at most, which moves a convex combination of
    values by at most twice that times max|v|; summing n weighted values adds n + 2 roundings of max|v|, and
    the result is rounded once to the activation type."""
    from kataru.model import apply_rotary

    g = torch.Generator().manual_seed(3)
    k = torch.randn(5, kv_heads, 40, dim, generator=g).to(dtype)
    v = torch.randn(5, kv_heads, 40, dim, generator=g).to(dtype)
    qkv = torch.randn(4, (heads + 2 * kv_heads) * dim, generator=g).to(dtype)
    rope = torch.randn(4, 4, rot, generator=g).to(dtype) if rot else None
    rows, slots = torch.tensor([3, 0, 4, 1]), torch.tensor([10, 0, 39, 25])
    k_ref, v_ref = k.clone(), v.clone()
    got = kernels.decode_attention(qkv, rope, k, v, rows, slots, heads, window)

    q, k_new, v_new = qkv.view(4, heads + 2 * kv_heads, dim).split([heads, kv_heads, kv_heads], dim=1)
    if rope is not None:
        q, k_new = apply_rotary(q, rope[0, :, None], rope[1, :, None]), apply_rotary(k_new, rope[2, :, None],
                                                                                       rope[3, :, None])
    k_ref[rows, :, slots], v_ref[rows, :, slots] = k_new, v_new
    assert torch.equal(k, k_ref) and torch.equal(v, v_ref)
    exact, vmax = reference_attention(q, k_ref, v_ref, rows, slots, window)
    scores_err = dim * 2**-24 * (q.double().abs().sum(-1, keepdim=True) * k_ref.double().abs().max()) / dim**0.5
    bound = (2 * (scores_err + 3e-7) + 42 * 2**-24) * vmax + exact.abs() * (2**-8 if dtype == torch.bfloat16 else 0)
    assert got.dtype == dtype and ((got.view(4, heads, dim).double() - exact).abs() <= bound).all()


@needs_kernel
@pytest.mark.parametrize("family", ["llama", "gpt_neox", "stablelm", "mistral", "japanese_stablelm_alpha"])
def test_engine_decode_attends_on_the_kernel_with_the_logits_of_sdpa(family: str, checkpoints: dict) -> None:
    """The model's one-token step with per-row slots (the engine's) gives SDPA's logits within float32 noise,
    for rows of different lengths in a shared cache, in every family (partial rotary, xPos, a window)."""
    import kataru

    model = kataru.load(checkpoints[family][0], dtype="float32").model
    cache = model.new_cache(3, 64)
    torch.manual_seed(0)
    with torch.inference_mode():
        for row, length in enumerate((7, 20, 3)):
            model.prefill(torch.randint(3, 100, (1, length)), cache, row, 0)
    tokens, slots, rows = torch.randint(3, 100, (3, 1)), torch.tensor([7, 20, 3]), torch.tensor([0, 1, 2])
    with torch.inference_mode():
        assert kernels.attention_applicable(cache.k[0], torch.float32, model.config.head_dim)
        saved = [t.clone() for t in (*cache.k, *cache.v)]
        fast = model.decode(tokens, cache, rows, slots, 21)
        for t, s in zip((*cache.k, *cache.v), saved, strict=True):  # the SDPA step writes the same slots again
            t.copy_(s)
        with kernels.disabled():
            sdpa = model.decode(tokens, cache, rows, slots, 21)
    assert torch.allclose(fast, sdpa, atol=1e-4, rtol=0) and not torch.equal(fast, sdpa)


@needs_kernel
def test_kernels_switch_off_by_kind_and_stub_for_experiments() -> None:
    """`disabled("norm")` sends norms to torch and leaves the matmul kernel on; `stubbed()` makes every kernel
    call return at once (its output zero), which is how bench/decode_overhead.py times the rest."""
    x, weight = torch.randn(2, 64), torch.ones(64)
    assert kernels.norm_applicable(x, weight) and kernels.available("linear")
    with kernels.disabled("norm"):
        assert not kernels.norm_applicable(x, weight) and kernels.available("linear")
        assert kernels.available("attention")
    with kernels.disabled():
        assert not any(kernels.available(kind) for kind in kernels.KINDS)
    assert kernels.norm_applicable(x, weight)
    with pytest.raises(ValueError, match="unknown kernel kind"), kernels.disabled("softmax"):
        pass
    w = torch.randn(16, 64).bfloat16()
    y = kernels.linear_half(x.bfloat16(), w)
    with kernels.stubbed():
        stub = kernels.linear_half(x.bfloat16(), w)
    assert stub.shape == y.shape and torch.equal(kernels.linear_half(x.bfloat16(), w), y)
    assert not stub.any()  # zeros, not garbage: NaN logits would end the request as a failed row
