"""The bf16 decode kernel: error bound against float64, the same bits at every batch size, fallbacks."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from kataru import kernels
from kataru.model import Linear

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
def test_error_is_within_float32_accumulation_and_one_bf16_rounding(rows: int, k: int, n: int) -> None:
    """Summing k products in float32 errs by at most k * 2^-24 * sum|x w| (plus one more term for the bias);
    rounding the result to bf16 adds at most 2^-8 of its size."""
    x, w, b = operands(rows, k, n)
    exact = x.double() @ w.double().t() + b.double()
    got = kernels.linear_bf16(x, w, b)
    assert got.dtype == torch.bfloat16 and got.shape == (rows, n)
    bound = 2**-8 * exact.abs() + (k + 1) * 2**-24 * (x.double().abs() @ w.double().abs().t() + b.double().abs())
    assert ((got.double() - exact).abs() <= bound * 1.01).all()


def int8_operands(rows: int, k: int, n: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    x, w, b = operands(rows, k, n)
    q = torch.randint(-127, 128, (n, k), generator=torch.Generator().manual_seed(1), dtype=torch.int8)
    scales = w.float().abs().amax(dim=1) / 127
    return x, q, scales, b


@needs_kernel
@pytest.mark.parametrize("k,n", [(256, 96), (70, 37), (5, 3), (4096 + 24, 40)])  # the last: several int32 flushes
@pytest.mark.parametrize("rows", [1, 2, 5, 8, 17])
def test_int8_error_is_within_input_quantization_and_float32_rounding(rows: int, k: int, n: int) -> None:
    """Each input becomes int16 steps of d = max|x_row| / 32767, off by at most d/2, which moves the sum by at
    most d/2 * sum|w|. The int32 sums are exact; converting and adding them, the two scalings and the bias
    are at most k + 3 float32 roundings of sum(|x| + d/2)|w|; the result is rounded to bf16 (2^-8)."""
    x, q, scales, b = int8_operands(rows, k, n)
    w = q.double() * scales.double()[:, None]
    exact = x.double() @ w.t() + b.double()
    got = kernels.linear_int8(x, q, scales, b)
    assert got.dtype == torch.bfloat16 and got.shape == (rows, n)
    half_step = x.double().abs().amax(dim=1, keepdim=True) / 32767 / 2
    quantization = half_step * w.abs().sum(dim=1)[None, :]
    rounding = (k + 3) * 2**-24 * ((x.double().abs() + half_step) @ w.abs().t() + b.double().abs())
    bound = 2**-8 * exact.abs() + quantization + rounding
    assert ((got.double() - exact).abs() <= bound * 1.01).all()


@needs_kernel
def test_int8_sums_do_not_overflow_at_the_extremes() -> None:
    """Every product at its largest (127 * 32767) over a long row: int32 partial sums must be flushed in time."""
    k = 16384
    x = torch.full((2, k), 3.0).bfloat16()
    x[1] = -3.0
    q = torch.full((4, k), 127, dtype=torch.int8)
    q[1] = -127
    scales = torch.full((4,), 0.01)
    got = kernels.linear_int8(x, q, scales).double()
    exact = x.double() @ (q.double() * 0.01).t()
    assert torch.allclose(got, exact, rtol=2**-8, atol=0)


@needs_kernel
def test_a_row_gets_the_same_bits_alone_and_in_any_batch() -> None:
    """The engine's greedy results must not depend on what else is in the batch."""
    x, w, _ = operands(17, 2048 + 24, 301)
    _, q, scales, _ = int8_operands(17, 2048 + 24, 301)
    for fn in (lambda rows: kernels.linear_bf16(rows, w), lambda rows: kernels.linear_int8(rows, q, scales)):
        alone = torch.cat([fn(x[i:i + 1]) for i in range(17)])
        for rows in (2, 3, 4, 5, 8, 17):
            assert torch.equal(fn(x[:rows]), alone[:rows])


@needs_kernel
def test_linear_uses_the_kernel_for_decode_rows_only_without_gradients() -> None:
    torch.manual_seed(0)
    linear = Linear(64, 48).bfloat16().requires_grad_(False)
    x = torch.randn(3, 64).bfloat16()
    assert torch.equal(linear(x), kernels.linear_bf16(x, linear.weight, linear.bias))
    with kernels.disabled():
        assert kernels.library() is None
        assert torch.equal(linear(x), F.linear(x, linear.weight, linear.bias))
    assert kernels.available()
    trainable = Linear(64, 48).bfloat16()
    assert torch.equal(trainable(x), F.linear(x, trainable.weight, trainable.bias))  # autograd needs torch's op
    many = torch.randn(Linear.upcast_rows, 64).bfloat16()  # prefill rows take the float32 GEMM
    expected = F.linear(many.float(), linear.weight.float(), linear.bias.float()).bfloat16()
    assert torch.equal(linear(many), expected)


def test_without_a_compiler_torch_matmul_takes_over(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(kernels, "_state", {})
    monkeypatch.setenv("KATARU_CACHE", str(tmp_path))
    monkeypatch.setenv("CC", "/nonexistent/cc")
    assert kernels.library() is None
    assert list(tmp_path.rglob("*.so")) == []
    torch.manual_seed(0)
    linear = Linear(64, 48).bfloat16().requires_grad_(False)
    x = torch.randn(2, 64).bfloat16()
    assert torch.equal(linear(x), F.linear(x, linear.weight, linear.bias))


def test_switched_off_by_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(kernels, "_state", {})
    monkeypatch.setenv("KATARU_KERNELS", "0")
    assert not kernels.supported() and kernels.library() is None


@needs_kernel
def test_a_build_is_cached_and_leaves_no_temp_files(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("KATARU_CACHE", str(tmp_path))
    first = kernels.build()
    stamp = first.stat().st_mtime_ns
    assert kernels.build() == first and first.stat().st_mtime_ns == stamp  # not compiled again
    assert [p.name for p in first.parent.iterdir()] == [first.name]
