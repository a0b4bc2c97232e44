"""Where a pass's new tokens sit in the paged KV pool: `AttentionBatch`, built once per
forward pass and read by every layer's attention, whichever implementation runs it
(the references in `selfspec_kernels.attention`, `cpu_attention`, `paged_attention`,
`cpu_layers`). A module of its own so that those import it and not each other.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch


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
