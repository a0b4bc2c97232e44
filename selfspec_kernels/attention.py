"""Paged attention over the KV pool: the PyTorch references, and dispatch by backend.

One call serves every step the engine takes: prefill chunks, single-token decode
and multi-token verification, for a batch of sequences of different lengths.

`impl` is the model's backend's attention (`selfspec_kernels.backend`), and
`paged_attention_for(impl)` its attention function: `triton` goes to
the Triton kernels (`paged_attention`, `kv_append`), which read the pool
through the block tables with no padding; `cpu`, with a batch built without the
reference's fields (few-row passes), to `selfspec_kernels.cpu_attention`. The rest runs in
PyTorch: a batch with the reference's fields pads queries to `[B, Tq]`, gathers keys to
`[B, Lk]` and masks (one call, for prefill); a batch without them runs each query on
its own over exactly the keys it sees, which gives a query the same bits whatever else
is in the pass, as greedy exactness needs.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from selfspec_kernels.attention_batch import AttentionBatch

__all__ = [
    "AttentionBatch",  # its home is selfspec_kernels.attention_batch; imported from here too
    "write_kv",
    "write_kv_reference",
    "Attention",
    "paged_attention_for",
    "paged_attention_reference",
    "paged_attention_by_query",
]


def write_kv(
    kv_cache: torch.Tensor, batch: AttentionBatch, kv: torch.Tensor, impl: str = "torch"
) -> None:
    """Store the new tokens' keys and values (`[T, 2 * kv_dim]`) in their slots."""
    if impl == "triton":
        from selfspec_kernels.kv_append import append_kv

        append_kv(kv_cache, batch.slots, kv)
    else:
        write_kv_reference(kv_cache, batch, kv)


def write_kv_reference(kv_cache: torch.Tensor, batch: AttentionBatch, kv: torch.Tensor) -> None:
    """What `write_kv` does, on any device."""
    kv_cache.index_copy_(0, batch.slots, kv.to(kv_cache.dtype))


# (q `[T, H, D]`, kv_cache, batch, num_kv_heads, scale) -> `[T, H * D]`
Attention = Callable[[torch.Tensor, torch.Tensor, AttentionBatch, int, float], torch.Tensor]


def paged_attention_for(impl: str = "torch") -> Attention:
    """The attention of new queries over the pool on backend attention `impl`, found
    once (a model keeps it) rather than on every call."""
    if impl == "triton":
        from selfspec_kernels import paged_attention

        return paged_attention.paged_attention
    if impl == "cpu":
        from selfspec_kernels import cpu_attention

        kernel = cpu_attention.paged_attention
    else:
        kernel = paged_attention_by_query

    def attend(q, kv_cache, batch: AttentionBatch, num_kv_heads: int, scale: float):
        # A batch built with the reference's fields (a bulk pass: prefill, many rows) runs
        # padded, in one call.
        run = paged_attention_reference if batch.mask is not None else kernel
        return run(q, kv_cache, batch, num_kv_heads, scale)

    return attend


def paged_attention_reference(
    q: torch.Tensor, kv_cache: torch.Tensor, batch: AttentionBatch, num_kv_heads: int, scale: float
) -> torch.Tensor:
    """What every `paged_attention_for` computes, on any device: pad, gather, mask, SDPA."""
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
    """What every `paged_attention_for` computes, one query at a time over exactly the keys it
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
