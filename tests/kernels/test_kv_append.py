"""The Triton KV append against `index_copy_`, the reference: every written row equal,
bit for bit, and every other row untouched."""

from __future__ import annotations

import pytest
import torch

from selfspec_kernels import attention
from selfspec_kernels.attention import AttentionBatch
from selfspec_kernels.kv_append import append_kv

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # the CPU runs the interpreter
DTYPES = [torch.float32, torch.float16, torch.bfloat16]

# (new tokens, pool slots, row width = 2 * kv_heads * head_dim)
SHAPES = [(1, 8, 32), (5, 37, 30), (13, 64, 2 * 8 * 128 + 2 * 3 * 16), (7, 7, 6)]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("tokens,slots,width", SHAPES)
def test_matches_index_copy(tokens: int, slots: int, width: int, dtype: torch.dtype) -> None:
    g = torch.Generator().manual_seed(tokens * 100 + width)
    cache = _nonzero(torch.randn(slots, width, generator=g)).to(dtype)
    kv = _nonzero(torch.randn(tokens, width, generator=g)).to(dtype)
    where = torch.randperm(slots, generator=g)[:tokens]
    cache[where] = float("nan")  # a row the kernel fails to write stays NaN
    want = cache.clone().index_copy_(0, where, kv)
    got = cache.clone().to(DEVICE)
    append_kv(got, where.to(DEVICE), kv.to(DEVICE))
    assert torch.equal(got.cpu(), want)


def test_batch_slots_from_block_tables() -> None:
    """Ragged sequences with partially filled blocks, slots as the engine computes them."""
    block_size, width = 4, 24
    tables = [[5, 2, 7], [0], [3, 6]]
    batch = AttentionBatch.build(tables, [3, 0, 6], [5, 3, 1], block_size)
    g = torch.Generator().manual_seed(7)
    cache = _nonzero(torch.randn(8 * block_size, width, generator=g))
    kv = _nonzero(torch.randn(batch.slots.numel(), width, generator=g))
    want = cache.clone()
    attention.write_kv(want, batch, kv)  # the CPU path: the reference
    got = cache.clone().to(DEVICE)
    append_kv(got, batch.slots.to(DEVICE), kv.to(DEVICE))
    assert torch.equal(got.cpu(), want)
    assert not torch.equal(want, cache)


def test_empty_batch_is_a_no_op() -> None:
    cache = torch.ones(4, 8, device=DEVICE)
    append_kv(cache, torch.zeros(0, dtype=torch.long, device=DEVICE), cache[:0])
    assert torch.equal(cache.cpu(), torch.ones(4, 8))


def _nonzero(x: torch.Tensor) -> torch.Tensor:
    return torch.where(x == 0, 0.5, x)
