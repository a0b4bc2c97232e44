"""Paged attention in Triton: decode, verification and prefill chunks in one launch.

Computes what `selfspec_kernels.attention.paged_attention_reference` computes, reading keys
and values straight from the pool through each sequence's block table, with no
padding of ragged batches and no mask tensor.

One program handles one sequence, one KV head, a block of query rows and one split
of the keys. The rows are the (new token, query head) pairs that share that KV head,
so with grouped-query attention every key tile is read once for the whole group.
Causality inside the drafted window comes from positions: new token t of sequence b
sits at position `starts[b] + t` and sees keys up to it. Keys are split into chunks of
`split_keys` positions, each chunk its own program, so that batch 1 decode over a long
context still fills the GPU; a second kernel merges the chunks (flash-decoding).

Every query's result is bit-identical whatever else is in the launch: tile sizes, the
chunk boundaries (absolute positions) and the merge order are fixed, and what a longer
batch adds for a query (masked keys, empty chunks) contributes exact zeros. So a drafted
token verified in a window of 8 gets the same attention output as when decoded alone,
at any batch size: the property greedy exactness needs from attention.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from selfspec_kernels.attention_batch import AttentionBatch
from selfspec_kernels.triton_common import interpreting

BLOCK_M = 64  # query rows per program (fixed: see the module docstring)
BLOCK_N = 64  # keys per tile
SPLIT_KEYS = 256  # keys per split
NUM_WARPS = 4


@triton.jit
def _attention_kernel(
    q_ptr,
    kv_ptr,
    out_ptr,
    part_out_ptr,
    part_lse_ptr,
    tables_ptr,
    starts_ptr,
    q_lens_ptr,
    q_offsets_ptr,
    scale_log2,
    stride_qt,
    stride_qh,
    stride_kv,
    stride_tab,
    stride_ot,
    num_kv_heads,
    kv_dim,
    block_size,
    window,
    num_splits,
    H: tl.constexpr,
    G: tl.constexpr,
    D: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    SPLIT: tl.constexpr,
    TILES_PER_SPLIT: tl.constexpr,
    HAS_WINDOW: tl.constexpr,
    F32_DOT: tl.constexpr,
):
    pid = tl.program_id(0)
    b = pid // num_kv_heads
    g = pid % num_kv_heads
    m_block = tl.program_id(1)
    split = tl.program_id(2)
    q_len = tl.load(q_lens_ptr + b)
    if m_block * BLOCK_M >= q_len * G:
        return  # a query block past this sequence's tokens (the grid fits the longest)
    start = tl.load(starts_ptr + b)
    q_off = tl.load(q_offsets_ptr + b)

    rows = m_block * BLOCK_M + tl.arange(0, BLOCK_M)
    t = rows // G
    head = g * G + rows % G
    row_ok = t < q_len
    q_pos = start + t
    d = tl.arange(0, BLOCK_D)
    d_ok = d < D
    q = tl.load(
        q_ptr + (q_off + t)[:, None] * stride_qt + head[:, None] * stride_qh + d[None, :],
        mask=row_ok[:, None] & d_ok[None, :],
        other=0.0,
    )
    if F32_DOT:
        q = q.to(tl.float32)

    # Key tiles (BLOCK_N positions from position 0) this split holds that the block sees.
    t_last = tl.minimum(q_len - 1, (m_block * BLOCK_M + BLOCK_M - 1) // G)
    hi = start + t_last + 1
    tile_lo = 0
    tile_hi = tl.cdiv(hi, BLOCK_N)
    if SPLIT:
        tile_lo = split * TILES_PER_SPLIT
        tile_hi = tl.minimum(tile_hi, tile_lo + TILES_PER_SPLIT)
    if HAS_WINDOW:
        lo = tl.maximum(start + (m_block * BLOCK_M) // G - window + 1, 0)
        tile_lo = tl.maximum(tile_lo, lo // BLOCK_N)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    k_base = kv_ptr + g * D + d[None, :]
    for tile in range(tile_lo, tile_hi):
        k_pos = tile * BLOCK_N + tl.arange(0, BLOCK_N)
        k_ok = k_pos < hi
        block = tl.load(tables_ptr + b * stride_tab + k_pos // block_size, mask=k_ok, other=0)
        slot = block.to(tl.int64) * block_size + k_pos % block_size
        kv_mask = k_ok[:, None] & d_ok[None, :]
        k = tl.load(k_base + slot[:, None] * stride_kv, mask=kv_mask, other=0.0)
        v = tl.load(k_base + kv_dim + slot[:, None] * stride_kv, mask=kv_mask, other=0.0)
        if F32_DOT:
            s = tl.dot(q, tl.trans(k.to(tl.float32)), input_precision="ieee")
        else:
            s = tl.dot(q, tl.trans(k))
        s *= scale_log2
        seen = (k_pos[None, :] <= q_pos[:, None]) & k_ok[None, :]
        if HAS_WINDOW:
            seen &= k_pos[None, :] > q_pos[:, None] - window
        s = tl.where(seen, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        # A row that has seen no key yet keeps m = -inf; shift by 0 so exp2 gives 0, not NaN.
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp2(s - m_safe[:, None])
        alpha = tl.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        if F32_DOT:
            pv = tl.dot(p, v.to(tl.float32), input_precision="ieee")
        else:
            pv = tl.dot(p.to(v.dtype), v)
        acc = acc * alpha[:, None] + pv
        m_i = m_new

    out_cols = head[:, None] * D + d[None, :]
    out_mask = row_ok[:, None] & d_ok[None, :]
    # l = 0: a padding row, or a split that saw no key (stored with weight -inf).
    safe_l = tl.where(l_i > 0, l_i, 1.0)
    if not SPLIT:
        out = acc / safe_l[:, None]
        tl.store(out_ptr + (q_off + t)[:, None] * stride_ot + out_cols, out, mask=out_mask)
    else:
        # Partial result normalised by its own sum, and its log2-sum-exp for the merge.
        lse = tl.where(l_i > 0, m_i + tl.log2(safe_l), float("-inf"))
        part_row = ((q_off + t) * H + head) * num_splits + split
        tl.store(
            part_out_ptr + part_row[:, None] * D + d[None, :], acc / safe_l[:, None], mask=out_mask
        )
        tl.store(part_lse_ptr + part_row, lse, mask=row_ok)


@triton.jit
def _merge_kernel(
    part_out_ptr,
    part_lse_ptr,
    out_ptr,
    stride_ot,
    num_splits,
    H: tl.constexpr,
    D: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    row = tl.program_id(0)  # token * H + head
    d = tl.arange(0, BLOCK_D)
    first = row * num_splits
    m = tl.full([], float("-inf"), tl.float32)
    for s in range(num_splits):
        m = tl.maximum(m, tl.load(part_lse_ptr + first + s))  # finite: its own key is in a split
    # In split order, one at a time: splits a query does not reach add exact zeros, so
    # its result does not depend on how many splits the batch's longest sequence needs.
    acc = tl.zeros([BLOCK_D], tl.float32)
    total = tl.full([], 0.0, tl.float32)
    for s in range(num_splits):
        w = tl.exp2(tl.load(part_lse_ptr + first + s) - m)
        acc += w * tl.load(part_out_ptr + (first + s) * D + d, mask=d < D, other=0.0)
        total += w
    token, head = row // H, row % H
    tl.store(out_ptr + token * stride_ot + head * D + d, acc / total, mask=d < D)


def paged_attention(
    q: torch.Tensor,
    kv_cache: torch.Tensor,
    batch: AttentionBatch,
    num_kv_heads: int,
    scale: float,
    *,
    split_keys: int = SPLIT_KEYS,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Attention of new queries `[T, H, D]` over the pool; returns `[T, H * D]` (in `out`
    when given). `split_keys`, a multiple of BLOCK_N, is the key positions per split."""
    T, H, D = q.shape
    G = H // num_kv_heads
    if split_keys % BLOCK_N:
        raise ValueError(f"split_keys must be a multiple of {BLOCK_N}, got {split_keys}")
    if q.stride(2) != 1:
        q = q.contiguous()
    if out is None:
        out = torch.empty(T, H * D, dtype=q.dtype, device=q.device)
    if T == 0:
        return out
    m_blocks = triton.cdiv(batch.q_len * G, BLOCK_M)
    splits = triton.cdiv(batch.kv_len, split_keys)  # shapes only: a CUDA graph stays valid
    block_d = max(16, triton.next_power_of_2(D))
    if splits > 1:
        part_out = torch.empty(T * H * splits, D, dtype=torch.float32, device=q.device)
        part_lse = torch.empty(T * H * splits, dtype=torch.float32, device=q.device)
    else:
        part_out = part_lse = out  # unused
    _attention_kernel[(batch.batch * num_kv_heads, m_blocks, splits)](
        q,
        kv_cache,
        out,
        part_out,
        part_lse,
        batch.tables,
        batch.starts,
        batch.q_lens,
        batch.q_offsets,
        scale * 1.4426950408889634,  # exp2 in the kernel: fold log2(e) into the scale
        q.stride(0),
        q.stride(1),
        kv_cache.stride(0),
        batch.tables.stride(0),
        out.stride(0),
        num_kv_heads,
        num_kv_heads * D,
        batch.block_size,
        batch.sliding_window or 0,
        splits,
        H=H,
        G=G,
        D=D,
        BLOCK_D=block_d,
        BLOCK_M=BLOCK_M,
        BLOCK_N=BLOCK_N,
        SPLIT=splits > 1,
        TILES_PER_SPLIT=split_keys // BLOCK_N,
        HAS_WINDOW=batch.sliding_window is not None,
        F32_DOT=_f32_dot(q.dtype),
        num_warps=NUM_WARPS,
    )
    if splits > 1:
        _merge_kernel[(T * H,)](
            part_out, part_lse, out, out.stride(0), splits, H=H, D=D, BLOCK_D=block_d
        )
    return out


def _f32_dot(dtype: torch.dtype) -> bool:
    """Products in float32 for float32 inputs (tensor-core TF32 would lose precision the
    reference keeps), and under the interpreter, whose bfloat16 `dot` is wrong."""
    return dtype == torch.float32 or interpreting()
