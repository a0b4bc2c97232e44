"""Paged attention over the KV pool: the PyTorch references, and dispatch by backend.

One call serves every step the engine takes: prefill chunks, single-token decode
and multi-token verification, for a batch of sequences of different lengths.

`impl` is the model's backend's attention (`kernels.backend`): `triton` goes to the
Triton kernels (`kernels.paged_attention`, `kernels.kv_append`), which read the pool
through the block tables with no padding; `cpu`, with a batch built without the
reference's fields (few-row passes), to `kernels.cpu_attention`. The rest runs in
PyTorch: a batch with the reference's fields pads queries to `[B, Tq]`, gathers keys to
`[B, Lk]` and masks (one call, for prefill); a batch without them runs each query on
its own over exactly the keys it sees, which gives a query the same bits whatever else
is in the pass, as greedy exactness needs.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class AttentionBatch:
    """Where a step's tokens sit, computed once per forward and shared by all layers."""

    positions: torch.Tensor  # [T] position of each new token
    slots: torch.Tensor  # [T] flat pool slot each new token's KV is written to
    # The reference's padded gather and mask; None where only the Triton kernels run.
    kv_index: torch.Tensor | None  # [B * Lk] flat pool slot of each key, padded
    mask: torch.Tensor | None  # [B, 1, Tq, Lk] True where a query may attend a key
    q_index: torch.Tensor | None  # [B * Tq] token of each padded query row; None: no padding
    out_index: torch.Tensor | None  # [T] padded row of each token; None: no padding
    batch: int
    q_len: int
    kv_len: int
    # What the Triton kernels read instead of the padded gather and the mask.
    tables: torch.Tensor | None = None  # [B, blocks] int32 block table, cut to kv_len
    starts: torch.Tensor | None = None  # [B] int32 position of each sequence's first new token
    q_lens: torch.Tensor | None = None  # [B] int32 new tokens per sequence
    q_offsets: torch.Tensor | None = None  # [B] int32 row of each sequence's first token in [T]
    block_size: int = 0
    sliding_window: int | None = None

    @classmethod
    def build(
        cls,
        block_tables: list[list[int]],
        starts: list[int],
        lengths: list[int],
        block_size: int,
        *,
        sliding_window: int | None = None,
        device: torch.device | str = "cpu",
        reference: bool = True,
    ) -> AttentionBatch:
        """Sequence b writes `lengths[b]` new tokens at positions `starts[b]`...

        `reference`: build what the padded PyTorch reference reads. The kernels and the
        per-query reference do without it, saving a mask of B * Tq * Lk bytes per step."""
        B, Tq = len(starts), max(lengths)
        Lk = max(s + n for s, n in zip(starts, lengths, strict=True))
        nb = -(-Lk // block_size)
        rows = [t[:nb] + [0] * (nb - len(t[:nb])) for t in block_tables]
        # Plain Python for the few numbers a decode step needs: a dozen small tensor ops
        # would cost more than the attention of a short context.
        positions = [p for s, n in zip(starts, lengths, strict=True) for p in range(s, s + n)]
        slots = [
            row[p // block_size] * block_size + p % block_size
            for row, s, n in zip(rows, starts, lengths, strict=True)
            for p in range(s, s + n)
        ]
        offsets = list(itertools.accumulate(lengths, initial=0))[:-1]
        tables = torch.tensor(rows, dtype=torch.int32)
        kv_index = mask = q_index = out_index = None
        if reference:
            start = torch.tensor(starts)[:, None]
            n = torch.tensor(lengths)[:, None]
            offs = torch.arange(Tq)[None, :]
            valid = offs < n  # [B, Tq]
            q_pos = torch.where(valid, start + offs, 0)  # padding rows look at key 0 only
            key_pos = torch.arange(Lk)
            kv_index = (
                tables.long()[:, key_pos // block_size] * block_size + key_pos % block_size
            ).flatten()
            mask = key_pos[None, None, :] <= q_pos[:, :, None]
            if sliding_window is not None:
                mask &= key_pos[None, None, :] > q_pos[:, :, None] - sliding_window
            mask = mask[:, None]
            if not all(x == Tq for x in lengths):
                q_index = torch.where(valid, torch.tensor(offsets)[:, None] + offs, 0).flatten()
                out_index = (torch.arange(B)[:, None] * Tq + offs)[valid]

        def dev(x):
            return None if x is None else x.to(device)

        return cls(
            positions=dev(torch.tensor(positions)),
            slots=dev(torch.tensor(slots)),
            kv_index=dev(kv_index),
            mask=dev(mask),
            q_index=dev(q_index),
            out_index=dev(out_index),
            batch=B,
            q_len=Tq,
            kv_len=Lk,
            tables=dev(tables),
            starts=dev(torch.tensor(starts, dtype=torch.int32)),
            q_lens=dev(torch.tensor(lengths, dtype=torch.int32)),
            q_offsets=dev(torch.tensor(offsets, dtype=torch.int32)),
            block_size=block_size,
            sliding_window=sliding_window,
        )


def write_kv(
    kv_cache: torch.Tensor, batch: AttentionBatch, kv: torch.Tensor, impl: str = "torch"
) -> None:
    """Store the new tokens' keys and values (`[T, 2 * kv_dim]`) in their slots."""
    if impl == "triton":
        from kernels.kv_append import append_kv

        append_kv(kv_cache, batch.slots, kv)
    else:
        write_kv_reference(kv_cache, batch, kv)


def write_kv_reference(kv_cache: torch.Tensor, batch: AttentionBatch, kv: torch.Tensor) -> None:
    """What `write_kv` does, on any device."""
    kv_cache.index_copy_(0, batch.slots, kv.to(kv_cache.dtype))


def paged_attention(
    q: torch.Tensor,
    kv_cache: torch.Tensor,
    batch: AttentionBatch,
    num_kv_heads: int,
    scale: float,
    impl: str = "torch",
) -> torch.Tensor:
    """Attention of new queries `[T, H, D]` over the pool; returns `[T, H * D]`."""
    if impl == "triton":
        from kernels.paged_attention import paged_attention as triton_attention

        return triton_attention(q, kv_cache, batch, num_kv_heads, scale)
    if batch.mask is not None:
        return paged_attention_reference(q, kv_cache, batch, num_kv_heads, scale)
    if impl == "cpu":
        from kernels import cpu_attention

        return cpu_attention.paged_attention(q, kv_cache, batch, num_kv_heads, scale)
    return paged_attention_by_query(q, kv_cache, batch, num_kv_heads, scale)


def paged_attention_reference(
    q: torch.Tensor, kv_cache: torch.Tensor, batch: AttentionBatch, num_kv_heads: int, scale: float
) -> torch.Tensor:
    """What `paged_attention` computes, on any device: pad, gather, mask, SDPA."""
    if batch.mask is None:
        raise ValueError("this AttentionBatch was built without the reference's fields")
    T, H, D = q.shape
    B, Tq, Lk = batch.batch, batch.q_len, batch.kv_len
    if batch.q_index is not None:
        q = q.index_select(0, batch.q_index)
    q = q.view(B, Tq, H, D).transpose(1, 2)
    kv = kv_cache.index_select(0, batch.kv_index).view(B, Lk, 2, num_kv_heads, D)
    kv = kv.to(q.dtype)  # a bfloat16 pool under float32 arithmetic
    k = kv[:, :, 0].transpose(1, 2)
    v = kv[:, :, 1].transpose(1, 2)
    out = F.scaled_dot_product_attention(
        q, k, v, attn_mask=batch.mask, scale=scale, enable_gqa=num_kv_heads != H
    )
    out = out.transpose(1, 2).reshape(B * Tq, H * D)
    if batch.out_index is not None:
        out = out.index_select(0, batch.out_index)
    return out


def paged_attention_by_query(
    q: torch.Tensor, kv_cache: torch.Tensor, batch: AttentionBatch, num_kv_heads: int, scale: float
) -> torch.Tensor:
    """What `paged_attention` computes, one query at a time over exactly the keys it
    sees: the same shapes, so the same bits, whatever else the pass holds."""
    T, H, D = q.shape
    out = torch.empty(T, H * D, dtype=q.dtype, device=q.device)
    window, bs = batch.sliding_window, batch.block_size
    for b in range(batch.batch):
        table = batch.tables[b].long()
        first, offset = int(batch.starts[b]), int(batch.q_offsets[b])
        for t in range(int(batch.q_lens[b])):
            p = first + t
            keys = torch.arange(0 if window is None else max(0, p - window + 1), p + 1)
            keys = keys.to(q.device)
            kv = kv_cache.index_select(0, table[keys // bs] * bs + keys % bs)
            kv = kv.view(-1, 2, num_kv_heads, D).to(q.dtype).transpose(0, 2)  # [KV, 2, L, D]
            row = F.scaled_dot_product_attention(
                q[offset + t, :, None], kv[:, 0], kv[:, 1], scale=scale,
                enable_gqa=num_kv_heads != H,
            )  # fmt: skip
            out[offset + t] = row.flatten()
    return out
