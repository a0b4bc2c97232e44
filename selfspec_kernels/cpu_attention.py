"""Paged attention for a few new tokens per sequence on x86 CPUs with AVX2 and FMA.

Decode and verification passes attend 1 to a few dozen new queries per sequence over
the whole KV pool. The PyTorch reference gathers every key through the block table,
pads and masks, and runs SDPA; for a few queries its fixed cost is most of the work.
This kernel reads keys and values in place through the block table instead. A unit of
work is one query and one split of 256 key positions (`ATTENTION_SPLIT`, exported by
the module), for every head: it reads the pool
rows of its keys in order, whole (the keys and values of every KV head), so the reads
from memory spread over all of its arithmetic. Units are spread over OpenMP threads and
each query's splits are merged in order, as flash-decoding does.

Row invariance: a query's output depends only on that query, its position and the
keys and values at positions up to it, bit for bit, whatever else is in the pass,
how many queries it holds and however the work is split among threads. Splits start
at multiples of 256 positions; within one, scores come 8 keys at a time (8-lane dot
products summed in a fixed tree), their exponentials elementwise, the normaliser as 8
lane sums in key order then a fixed tree, the weighted values in key order. So
decoding one token and verifying it among drafted tokens give the same bits, which
keeps drafting exact.

The pool holds `[slots, 2 * kv_heads * head_dim]`, keys then values, in float32 or in
bfloat16 (rounded to nearest even when written, as PyTorch rounds; widened when read),
which halves the bytes that long contexts read. The C++ source,
`selfspec_kernels/csrc/attention.cpp`, is compiled on first use (`cpu_build`).
"""

from __future__ import annotations

import torch

from selfspec_kernels.cpu_build import CPU

__all__ = ["available", "unavailable_reason", "paged_attention", "rope_attention"]


def available() -> bool:
    """True when the kernel runs here: AVX2 and FMA, and the extension builds. Never raises."""
    return CPU.available()


def unavailable_reason() -> str | None:
    """Why `available()` is False (after calling it), or None."""
    return CPU.unavailable_reason()


def paged_attention(
    q: torch.Tensor, kv_cache: torch.Tensor, batch, num_kv_heads: int, scale: float
) -> torch.Tensor:
    """Attention of new queries `[T, H, D]` over the pool (an `AttentionBatch` says where
    they sit); returns `[T, H * D]`, as `selfspec_kernels.attention.paged_attention` does."""
    T, H, D = q.shape
    return _call(q.reshape(T, H * D), kv_cache, None, None, batch, (H, num_kv_heads, D), scale)


def rope_attention(
    qkv: torch.Tensor,
    kv_cache: torch.Tensor,
    batch,
    rope: torch.Tensor,
    heads: tuple[int, int, int],
    scale: float,
) -> torch.Tensor:
    """The whole attention step of new tokens from the fused projection `qkv`
    `[T, (H + 2 KV) * D]` (q and k rows in RoPE's adjacent pairs): rotate q and k by
    `rope` (`[T, D / 2, 2]`, cos and sin), write k and v to the tokens' slots, attend.
    `heads` is (H, KV, D). Returns `[T, H * D]`."""
    return _call(qkv, kv_cache, rope, batch.slots, batch, heads, scale)


def batch_fields(batch) -> tuple:
    """What the C++ side reads of an `AttentionBatch` besides slots and window: block
    tables, starts, query lengths and offsets, block size."""
    return batch.tables, batch.starts, batch.q_lens, batch.q_offsets, batch.block_size


def _call(q, kv_cache, rope, slots, batch, heads: tuple[int, int, int], scale: float):
    H, KV, D = heads
    window = batch.sliding_window or 0
    return CPU.ops().paged_attention(
        q, kv_cache, rope, slots, *batch_fields(batch), H, KV, D, scale, window
    )
