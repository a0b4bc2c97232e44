"""The bfloat16-weight CPU linear kernel: agrees with PyTorch, and each row's result is
bit-identical whatever else is in the batch."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from selfspec_kernels import cpu_linear

pytestmark = pytest.mark.skipif(
    not cpu_linear.available(),
    reason=f"cpu_linear kernel unavailable: {cpu_linear.unavailable_reason()}",
)

# (N, K): K not a multiple of 8 exercises the padding, N not a multiple of 4 the last group.
SHAPES = [(1, 577), (7, 100), (960, 576), (1536, 576), (576, 1536), (13, 9), (3, 5), (35, 577)]
MS = [1, 2, 3, 4, 5, 8, 11, 16]


def _linear(x, w, *args, **kwargs):
    """The kernel on an unpacked matrix."""
    return cpu_linear.linear_bf16(x, cpu_linear.pack(w), *args, **kwargs)


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
    y = _linear(x, w)
    assert y.shape == (m, n) and y.dtype == torch.float32
    _assert_close(y, cpu_linear.linear_bf16_reference(x, w), k)


@pytest.mark.parametrize("n,k", [(7, 100), (960, 576), (35, 577)])
def test_bias(n, k):
    x, w = _inputs(5, n, k)
    bias = torch.randn(n)
    y = _linear(x, w, bias)
    _assert_close(y, cpu_linear.linear_bf16_reference(x, w, bias), k)


@pytest.mark.parametrize("n,k", [(1, 577), (7, 100), (960, 576), (576, 1536), (13, 9)])
def test_row_invariance(n, k):
    """Row r of an m-row product equals the 1-row product of x[r], bit for bit, for every m."""
    x, w = _inputs(16, n, k, seed=1)
    single = [_linear(x[r : r + 1].clone(), w) for r in range(16)]
    other, _ = _inputs(16, n, k, seed=2)
    for m in range(1, 17):
        y = _linear(x[:m].contiguous(), w)
        for r in range(m):
            assert torch.equal(y[r], single[r][0]), (m, r)
        # The same row in another position, among other rows.
        mixed = other[:m].clone()
        mixed[m - 1] = x[0]
        assert torch.equal(_linear(mixed, w)[m - 1], single[0][0]), m


def _swiglu(x, gate, up, **kwargs):
    return cpu_linear.linear_bf16_swiglu(
        x, cpu_linear.pack(torch.cat([gate, up]), swiglu=True), **kwargs
    )


def test_row_invariance_fused():
    x, w = _inputs(16, 960, 576, seed=3)
    _, up = _inputs(1, 960, 576, seed=4)
    other = torch.randn(16, 960)
    gain = torch.rand(576) + 0.5
    packed = cpu_linear.pack(w)
    calls = {
        "add": lambda x, o: cpu_linear.linear_bf16_add(x, packed, o),
        "swiglu": lambda x, o: _swiglu(x, w, up, norm=(gain, 576e-5)),
        "norm": lambda x, o: cpu_linear.linear_bf16(x, packed, norm=(gain, 576e-5)),
    }
    for name, fn in calls.items():
        full = fn(x, other)
        for m in (1, 3, 16):
            for r in range(m):
                assert torch.equal(
                    full[r], fn(x[r : r + 1].clone(), other[r : r + 1].clone())[0]
                ), (
                    name,
                    m,
                    r,
                )


def test_deterministic_and_strided_rows():
    x, w = _inputs(8, 1536, 576)
    y = _linear(x, w)
    for _ in range(3):
        assert torch.equal(_linear(x, w), y)
    # Rows of a wider tensor (row stride > K, inner stride 1) give the same result.
    wide = torch.zeros(8, 600)
    wide[:, :576] = x
    assert torch.equal(_linear(wide[:, :576], w), y)


def test_thread_count_does_not_change_result():
    x, w = _inputs(6, 960, 577)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = _linear(x, w)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(_linear(x, w), one)


@pytest.mark.parametrize("n,k", [(7, 100), (1536, 576), (576, 1536), (35, 577)])
@pytest.mark.parametrize("m", [1, 4, 16])
def test_fused_epilogues(m, n, k):
    x, w = _inputs(m, n, k)
    _, up = _inputs(1, n, k, seed=5)
    other = torch.randn(m, n)
    packed = cpu_linear.pack(w)
    ref = cpu_linear.linear_bf16_reference(x, w)
    _assert_close(cpu_linear.linear_bf16_add(x, packed, other), ref + other, k)
    swiglu = F.silu(ref) * cpu_linear.linear_bf16_reference(x, up)
    _assert_close(_swiglu(x, w, up), swiglu, k)
    # The fused add equals the plain kernel followed by the add, exactly.
    assert torch.equal(cpu_linear.linear_bf16_add(x, packed, other), _linear(x, w) + other)


@pytest.mark.parametrize("n,k", [(7, 100), (960, 576), (35, 577)])
def test_fused_norm(n, k):
    """norm=(gain, n * eps) is the RMSNorm with the gain's sqrt(n) folded in."""
    x, w = _inputs(5, n, k)
    gain = torch.rand(k) + 0.5
    eps = 1e-5
    normed = x * torch.rsqrt(x.pow(2).sum(-1, keepdim=True) + k * eps) * gain
    ref = cpu_linear.linear_bf16_reference(normed, w)
    _assert_close(_linear(x, w, norm=(gain, k * eps)), ref, k)
    plain = cpu_linear.linear_bf16_reference(normed / gain, w)
    _assert_close(_linear(x, w, norm=(None, k * eps)), plain, k)


def test_pack_round_trips():
    for n, k in [(7, 100), (13, 9), (960, 576)]:
        _, w = _inputs(1, n, k)
        packed = cpu_linear.pack(w)
        assert torch.equal(packed.unpack(), w)
        index = torch.tensor([n - 1, 0, n // 2])
        assert torch.equal(packed.rows(index), w[index])
    _, gate_up = _inputs(1, 14, 20)
    assert torch.equal(cpu_linear.pack(gate_up, swiglu=True).unpack(), gate_up)
    with pytest.raises(ValueError, match="even number of rows"):
        cpu_linear.pack(gate_up[:13], swiglu=True)
    with pytest.raises(ValueError, match="bfloat16"):
        cpu_linear.pack(gate_up.float())


def test_fresh_outputs_and_empty():
    x, w = _inputs(3, 7, 100)
    a, b = _linear(x, w), _linear(x, w)
    assert a.data_ptr() != b.data_ptr() and torch.equal(a, b)
    assert _linear(torch.empty(0, 100), w).shape == (0, 7)


def test_rejects_bad_inputs():
    x, w = _inputs(2, 7, 100)
    packed = cpu_linear.pack(w)
    with pytest.raises(RuntimeError, match="packed by cpu_linear.pack"):
        cpu_linear.linear_bf16(x, cpu_linear.Packed(w, 7, 100))  # not packed
    with pytest.raises(RuntimeError):
        cpu_linear.linear_bf16(x.double(), packed)
    with pytest.raises(RuntimeError, match="columns"):
        cpu_linear.linear_bf16(x[:, :91], packed)  # K mismatch
    with pytest.raises(RuntimeError, match="residual"):
        cpu_linear.linear_bf16_add(x, packed, torch.randn(2, 6))
    with pytest.raises(ValueError, match="swiglu=True"):
        cpu_linear.linear_bf16_swiglu(x, packed)
