"""The bfloat16-weight CPU linear kernel: agrees with PyTorch, and each row's result is
bit-identical whatever else is in the batch."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from kernels import cpu_linear

pytestmark = pytest.mark.skipif(
    not cpu_linear.available(),
    reason=f"cpu_linear kernel unavailable: {cpu_linear.unavailable_reason()}",
)

# (N, K): odd K exercises the scalar tail, N not a multiple of the block the row tail.
SHAPES = [(1, 577), (7, 100), (960, 576), (1536, 576), (576, 1536), (13, 9), (3, 5), (35, 577)]
MS = [1, 2, 3, 4, 5, 8, 11, 16]


def _inputs(m: int, n: int, k: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed * 1000 + m * 7 + n * 3 + k)
    x = torch.randn(m, k, generator=g)
    x[x == 0] = 0.5  # non-zero inputs
    w = torch.randn(n, k, generator=g).to(torch.bfloat16)
    w[w == 0] = 0.25
    return x, w


def _assert_close(y: torch.Tensor, ref: torch.Tensor, k: int) -> None:
    # Both sides accumulate in float32 in different orders: the error grows ~sqrt(K).
    tol = 1e-4 * math.sqrt(k)
    scale = ref.abs().amax().clamp_min(1.0)
    torch.testing.assert_close(y, ref, rtol=tol, atol=tol * scale.item())


@pytest.mark.parametrize("n,k", SHAPES)
@pytest.mark.parametrize("m", MS)
def test_matches_reference(m, n, k):
    x, w = _inputs(m, n, k)
    y = cpu_linear.linear_bf16(x, w)
    assert y.shape == (m, n) and y.dtype == torch.float32
    _assert_close(y, cpu_linear.linear_bf16_reference(x, w), k)


@pytest.mark.parametrize("n,k", [(7, 100), (960, 576), (35, 577)])
def test_bias(n, k):
    x, w = _inputs(5, n, k)
    bias = torch.randn(n)
    y = cpu_linear.linear_bf16(x, w, bias)
    _assert_close(y, cpu_linear.linear_bf16_reference(x, w, bias), k)


@pytest.mark.parametrize("n,k", [(1, 577), (7, 100), (960, 576), (576, 1536), (13, 9)])
def test_row_invariance(n, k):
    """Row r of an m-row product equals the 1-row product of x[r], bit for bit, for every m."""
    x, w = _inputs(16, n, k, seed=1)
    single = [cpu_linear.linear_bf16(x[r : r + 1].clone(), w) for r in range(16)]
    other, _ = _inputs(16, n, k, seed=2)
    for m in range(1, 17):
        y = cpu_linear.linear_bf16(x[:m].contiguous(), w)
        for r in range(m):
            assert torch.equal(y[r], single[r][0]), (m, r)
        # The same row in another position, among other rows.
        mixed = other[:m].clone()
        mixed[m - 1] = x[0]
        assert torch.equal(cpu_linear.linear_bf16(mixed, w)[m - 1], single[0][0]), m


def test_row_invariance_fused():
    x, w = _inputs(16, 960, 576, seed=3)
    other = torch.randn(16, 960)
    for fn, args in [
        (cpu_linear.linear_bf16_add, (other,)),
        (cpu_linear.linear_bf16_mul, (other,)),
        (cpu_linear.linear_bf16_silu, ()),
    ]:
        full = fn(x, w, *args)
        for m in (1, 3, 16):
            for r in range(m):
                sub = fn(x[r : r + 1].clone(), w, *(a[r : r + 1].clone() for a in args))
                assert torch.equal(full[r], sub[0]), (fn.__name__, m, r)


def test_deterministic_and_strided_rows():
    x, w = _inputs(8, 1536, 576)
    y = cpu_linear.linear_bf16(x, w)
    for _ in range(3):
        assert torch.equal(cpu_linear.linear_bf16(x, w), y)
    # Rows of a wider tensor (row stride > K, inner stride 1) give the same result.
    wide = torch.zeros(8, 600)
    wide[:, :576] = x
    assert torch.equal(cpu_linear.linear_bf16(wide[:, :576], w), y)


def test_thread_count_does_not_change_result():
    x, w = _inputs(6, 960, 577)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = cpu_linear.linear_bf16(x, w)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(cpu_linear.linear_bf16(x, w), one)


@pytest.mark.parametrize("n,k", [(7, 100), (1536, 576), (576, 1536), (35, 577)])
@pytest.mark.parametrize("m", [1, 4, 16])
def test_fused_epilogues(m, n, k):
    x, w = _inputs(m, n, k)
    other = torch.randn(m, n)
    ref = cpu_linear.linear_bf16_reference(x, w)
    _assert_close(cpu_linear.linear_bf16_add(x, w, other), ref + other, k)
    _assert_close(cpu_linear.linear_bf16_mul(x, w, other), ref * other, k)
    _assert_close(cpu_linear.linear_bf16_silu(x, w), F.silu(ref), k)
    # The fused forms equal the plain kernel followed by the op, exactly.
    y = cpu_linear.linear_bf16(x, w)
    assert torch.equal(cpu_linear.linear_bf16_add(x, w, other), y + other)
    assert torch.equal(cpu_linear.linear_bf16_mul(x, w, other), y * other)


def test_fresh_outputs_and_empty():
    x, w = _inputs(3, 7, 100)
    a, b = cpu_linear.linear_bf16(x, w), cpu_linear.linear_bf16(x, w)
    assert a.data_ptr() != b.data_ptr() and torch.equal(a, b)
    assert cpu_linear.linear_bf16(torch.empty(0, 100), w).shape == (0, 7)


def test_rejects_bad_inputs():
    x, w = _inputs(2, 7, 100)
    with pytest.raises(RuntimeError):
        cpu_linear.linear_bf16(x, w.float())  # weights must be bfloat16
    with pytest.raises(RuntimeError):
        cpu_linear.linear_bf16(x.double(), w)
    with pytest.raises(RuntimeError):
        cpu_linear.linear_bf16(x[:, :99], w)  # K mismatch
    with pytest.raises(RuntimeError):
        cpu_linear.linear_bf16(x, w.t().contiguous().t())  # non-contiguous weights
    with pytest.raises(RuntimeError):
        cpu_linear.linear_bf16_add(x, w, torch.randn(2, 6))
