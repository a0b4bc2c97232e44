"""The CPU paged attention kernel against the reference, and its row invariance.

Reuses the Triton tests' cases: pool slots no sequence owns hold NaN, so a kernel that
reads past a sequence's keys fails.
"""

from __future__ import annotations

import pytest
import torch
from test_paged_attention import CASES, Case, _reference, _setup  # same folder: on sys.path

from selfspec_kernels import attention, cpu_attention
from selfspec_kernels.attention import AttentionBatch

pytestmark = pytest.mark.skipif(
    not cpu_attention.available(),
    reason=f"cpu_attention kernel unavailable: {cpu_attention.unavailable_reason()}",
)
# The engine's way to the kernel: a batch without the reference's fields goes to it.
CPU_ATTENTION = attention.paged_attention_for("cpu")


def _kernel_batch(tables, starts, lens, case: Case) -> AttentionBatch:
    return AttentionBatch.build(
        tables, starts, lens, case.block_size, sliding_window=case.window, reference=False
    )


POOL_DTYPES = [torch.float32, torch.bfloat16]


@pytest.mark.parametrize("pool_dtype", POOL_DTYPES, ids=str)
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_matches_reference(case: Case, pool_dtype: torch.dtype) -> None:
    """Queries in float32; the pool in float32 or bfloat16, widened as it is read."""
    q, pool, tables, ref_batch = _setup(case, torch.float32)
    pool = pool.to(pool_dtype)
    batch = _kernel_batch(tables, list(case.starts), list(case.lens), case)
    got = CPU_ATTENTION(q, pool, batch, case.kv_heads, case.head_dim**-0.5)
    torch.testing.assert_close(got, _reference(q, pool, ref_batch, case), rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("pool_dtype", POOL_DTYPES, ids=str)
@pytest.mark.parametrize("window", [None, 300])
def test_long_context_matches_reference(window: int | None, pool_dtype: torch.dtype) -> None:
    """Several splits of 256 keys, merged; with a window that starts inside a split."""
    case = Case(
        "long", (1500, 40), (3, 1), heads=9, kv_heads=3, head_dim=64, block_size=16, window=window
    )
    q, pool, tables, ref_batch = _setup(case, torch.float32, seed=2)
    pool = pool.to(pool_dtype)
    q = q * 4  # sharper softmax: large score gaps exercise the exponential's range
    batch = _kernel_batch(tables, list(case.starts), list(case.lens), case)
    got = CPU_ATTENTION(q, pool, batch, case.kv_heads, 0.125)
    torch.testing.assert_close(got, _reference(q, pool, ref_batch, case), rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("pool_dtype", POOL_DTYPES, ids=str)
@pytest.mark.parametrize("head_dim", [40, 64])
def test_row_invariant(pool_dtype: torch.dtype, head_dim: int) -> None:
    """A query's output is bit-identical whatever else is in the pass: a drafted token
    verified among others equals its decode alone, and the thread count changes nothing."""
    case = Case("verify", (61, 254, 7), (5, 4, 1), heads=8, kv_heads=2, head_dim=head_dim)
    q, pool, tables, _ = _setup(case, torch.float32, seed=3)
    pool = pool.to(pool_dtype)
    scale = case.head_dim**-0.5
    full = CPU_ATTENTION(
        q, pool, _kernel_batch(tables, [61, 254, 7], [5, 4, 1], case), case.kv_heads, scale
    )
    row = 0
    for i, (start, n) in enumerate(zip(case.starts, case.lens, strict=True)):
        for j in range(n):
            batch = _kernel_batch([tables[i]], [start + j], [1], case)
            alone = CPU_ATTENTION(q[row : row + 1], pool, batch, case.kv_heads, scale)
            assert torch.equal(alone[0], full[row]), (i, j)
            row += 1
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        batch = _kernel_batch(tables, [61, 254, 7], [5, 4, 1], case)
        one = CPU_ATTENTION(q, pool, batch, case.kv_heads, scale)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, full)


def test_rejects_bad_inputs() -> None:
    case = Case("decode", (3,), (1,))
    q, pool, tables, _ = _setup(case, torch.float32)
    batch = _kernel_batch(tables, [3], [1], case)
    with pytest.raises(RuntimeError, match="pool must be contiguous float32 or bfloat16"):
        cpu_attention.paged_attention(q, pool.half(), batch, case.kv_heads, 0.25)
    with pytest.raises(RuntimeError, match="pool must be"):
        cpu_attention.paged_attention(q, pool, batch, case.kv_heads + 1, 0.25)
    with pytest.raises(RuntimeError, match="belongs to no sequence"):
        cpu_attention.paged_attention(torch.cat([q, q]), pool, batch, case.kv_heads, 0.25)


@pytest.mark.parametrize("pool_dtype", POOL_DTYPES, ids=str)
def test_rope_attention_matches_the_separate_steps(pool_dtype: torch.dtype) -> None:
    """RoPE, the KV write and attention in one call equal the PyTorch steps one by one;
    a bfloat16 pool gets values rounded as PyTorch rounds them."""
    case = Case("verify", (20, 9), (3, 2), heads=6, kv_heads=2, head_dim=16, block_size=4)
    _, pool, tables, ref_batch = _setup(case, torch.float32, seed=4)
    pool = torch.nan_to_num(pool, nan=0.0).to(pool_dtype)
    H, KV, D, T = case.heads, case.kv_heads, case.head_dim, sum(case.lens)
    g = torch.Generator().manual_seed(5)
    qkv = torch.randn(T, (H + 2 * KV) * D, generator=g)
    angle = torch.rand(T, D // 2, generator=g) * 6.3
    rope = torch.polar(torch.ones_like(angle), angle)  # [T, D / 2] complex
    turned = torch.view_as_complex(qkv[:, : (H + KV) * D].reshape(T, H + KV, D // 2, 2))
    qk = torch.view_as_real(turned * rope[:, None]).reshape(T, (H + KV) * D)
    want_pool = pool.clone()
    attention.write_kv(want_pool, ref_batch, torch.cat((qk[:, H * D :], qkv[:, (H + KV) * D :]), 1))
    q = qk[:, : H * D].reshape(T, H, D)
    want = attention.paged_attention_reference(q, want_pool, ref_batch, KV, D**-0.5)
    batch = _kernel_batch(tables, list(case.starts), list(case.lens), case)
    got = cpu_attention.rope_attention(
        qkv, pool, batch, torch.view_as_real(rope).contiguous(), (H, KV, D), D**-0.5
    )
    values = slice(KV * D, None)  # copied, not computed: rounded bit for bit alike
    assert torch.equal(pool[:, values], want_pool[:, values])
    rounding = 1e-6 if pool_dtype == torch.float32 else 8e-3  # a bfloat16 step, for keys
    torch.testing.assert_close(pool, want_pool, rtol=rounding, atol=rounding)
    torch.testing.assert_close(got, want, rtol=2e-5, atol=2e-5)
