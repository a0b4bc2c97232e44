"""Fused acceptance in Triton: accepted lengths and next tokens for a batch, one launch.

`kernels.acceptance_ref.accept_reference` defines what this computes (greedy and
speculative sampling, the layout of the inputs, the sampling rule); read it first.
One program per sequence walks its drafted tokens until the first rejection, then
draws the next token from the target row there (argmax, residual or bonus), so a step
ends with two small tensors on the device and no host synchronisation in between.
The uniforms are inputs, drawn by the caller (`torch.rand` on the device), so the
kernel is deterministic and a CUDA graph can hold it.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK_V = 4096  # vocabulary entries per chunk: one program reads whole rows, so wide loads
NUM_WARPS = 8


@triton.jit
def _argmax_row(row_ptr, V, BLOCK_V: tl.constexpr):
    """Index of the row's maximum, the first one on a tie (as `torch.argmax`)."""
    best = tl.full([], float("-inf"), tl.float32)
    best_idx = tl.full([], 0, tl.int32)
    for start in range(0, V, BLOCK_V):
        offs = start + tl.arange(0, BLOCK_V)
        x = tl.load(row_ptr + offs, mask=offs < V, other=float("-inf")).to(tl.float32)
        m = tl.max(x, 0)
        i = tl.argmax(x, 0, tie_break_left=True) + start
        take = m > best  # strict: an equal maximum in a later chunk is not first
        best_idx = tl.where(take, i, best_idx)
        best = tl.where(take, m, best)
    return best_idx


@triton.jit
def _weights(p_ptr, q_ptr, offs, ok, q_len, point):
    """max(p - q, 0) on a chunk: q a row (q_len = V), a point mass at `point` (>= 0), or 0
    (q_len = 0). A length, not a flag: the interpreter rejects a mask `tensor & scalar`."""
    p = tl.load(p_ptr + offs, mask=ok, other=0.0).to(tl.float32)
    q = tl.load(q_ptr + offs, mask=offs < q_len, other=0.0).to(tl.float32)
    q = tl.where(offs == point, 1.0, q)
    return tl.maximum(p - q, 0.0)


@triton.jit
def _sample_row(p_ptr, q_ptr, q_len, point, V, u, BLOCK_V: tl.constexpr):
    """Inverse-CDF sample from max(p - q, 0), or from p where that is all zero."""
    total_r = tl.full([], 0.0, tl.float32)
    total_p = tl.full([], 0.0, tl.float32)
    for start in range(0, V, BLOCK_V):
        offs = start + tl.arange(0, BLOCK_V)
        ok = offs < V
        total_r += tl.sum(_weights(p_ptr, q_ptr, offs, ok, q_len, point), 0)
        total_p += tl.sum(tl.load(p_ptr + offs, mask=ok, other=0.0).to(tl.float32), 0)
    keep_q = total_r > 0
    q_len = tl.where(keep_q, q_len, 0)
    point = tl.where(keep_q, point, -1)
    threshold = u * tl.where(keep_q, total_r, total_p)
    running = tl.full([], 0.0, tl.float32)
    found = tl.zeros([], tl.int32) + V
    last = tl.full([], -1, tl.int32)
    for start in range(0, V, BLOCK_V):
        offs = start + tl.arange(0, BLOCK_V)
        ok = offs < V
        w = _weights(p_ptr, q_ptr, offs, ok, q_len, point)
        c = tl.cumsum(w, 0) + running
        found = tl.minimum(found, tl.min(tl.where((c > threshold) & ok, offs, V), 0))
        last = tl.maximum(last, tl.max(tl.where(w > 0, offs, -1), 0))
        running += tl.sum(w, 0)
    return tl.where(found < V, found, last)  # rounding can leave u * total past the end


@triton.jit
def _accept_kernel(
    draft_ptr,
    stride_draft,
    lens_ptr,
    target_ptr,
    stride_target,
    greedy_ptr,
    q_ptr,
    stride_q,
    has_q_ptr,
    u_accept_ptr,
    stride_u,
    u_final_ptr,
    accepted_ptr,
    next_ptr,
    B,
    V,
    BLOCK_B: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    b = tl.program_id(0)
    # Where this sequence's rows start: the rows of the sequences before it.
    others = tl.arange(0, BLOCK_B)
    before = others < b
    lens = tl.load(lens_ptr + others, mask=others < B, other=0).to(tl.int32)
    has_q_all = tl.load(has_q_ptr + others, mask=others < B, other=0).to(tl.int32)
    row0 = tl.sum(tl.where(before, lens + 1, 0), 0)
    q_row0 = tl.sum(tl.where(before, lens * has_q_all, 0), 0)
    k = tl.load(lens_ptr + b).to(tl.int32)
    greedy = tl.load(greedy_ptr + b) != 0
    has_q = tl.load(has_q_ptr + b) != 0
    drafts = draft_ptr + b.to(tl.int64) * stride_draft

    n = tl.full([], 0, tl.int32)
    going = n < k
    while going:
        token = tl.load(drafts + n).to(tl.int32)
        row = target_ptr + (row0 + n).to(tl.int64) * stride_target
        if greedy:
            keep = _argmax_row(row, V, BLOCK_V) == token
        else:
            p = tl.load(row + token).to(tl.float32)
            q_at = q_ptr + (q_row0 + n).to(tl.int64) * stride_q + token
            q = tl.where(has_q, tl.load(q_at, mask=has_q, other=0.0).to(tl.float32), 1.0)
            u = tl.load(u_accept_ptr + b * stride_u + n)
            keep = (q > 0) & (u * q < p)  # accept with probability min(1, p / q)
        n += keep.to(tl.int32)
        going = keep & (n < k)

    row = target_ptr + (row0 + n).to(tl.int64) * stride_target
    if greedy:
        token = _argmax_row(row, V, BLOCK_V)
    else:
        rejected = n < k
        drafted = tl.load(drafts + n, mask=rejected, other=-1).to(tl.int32)
        point = tl.where(rejected & (has_q == 0), drafted, -1)
        q_row = q_ptr + (q_row0 + n).to(tl.int64) * stride_q
        u = tl.load(u_final_ptr + b)
        q_len = tl.where(rejected & has_q, V, 0)
        token = _sample_row(row, q_row, q_len, point, V, u, BLOCK_V)
    tl.store(accepted_ptr + b, n.to(tl.int64))
    tl.store(next_ptr + b, token.to(tl.int64))


def accept(
    draft_tokens: torch.Tensor,
    draft_lens: torch.Tensor,
    target: torch.Tensor,
    *,
    greedy: torch.Tensor | None = None,
    draft_probs: torch.Tensor | None = None,
    has_draft_probs: torch.Tensor | None = None,
    u_accept: torch.Tensor | None = None,
    u_final: torch.Tensor | None = None,
    out: tuple[torch.Tensor, torch.Tensor] | None = None,
    block_v: int = BLOCK_V,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(accepted drafted tokens `[B]`, next token `[B]`), both int64, in one launch (into
    `out` when given). Arguments as `kernels.acceptance_ref.accept_reference`; flags are
    bool tensors; `block_v` (a power of two) is the vocabulary chunk."""
    B = draft_tokens.shape[0]
    device = target.device
    if out is None:
        out = tuple(torch.empty(B, dtype=torch.int64, device=device) for _ in range(2))
    accepted, nxt = out
    if B == 0:
        return accepted, nxt
    if greedy is None:
        greedy = torch.ones(B, dtype=torch.bool, device=device)
    elif u_accept is None or u_final is None:
        raise ValueError("sampling sequences need u_accept and u_final")
    if has_draft_probs is None or draft_probs is None:
        has_draft_probs = torch.zeros(B, dtype=torch.bool, device=device)
    # Never read where they are absent: greedy rows need no uniforms, point masses no q.
    draft_probs = target if draft_probs is None else draft_probs
    u_accept = target if u_accept is None else u_accept
    u_final = target if u_final is None else u_final
    target, draft_probs = _unit_stride(target), _unit_stride(draft_probs)
    draft_tokens, u_accept = _unit_stride(draft_tokens), _unit_stride(u_accept)
    # Flags as bytes (a free view), which every Triton backend loads alike.
    greedy, has_draft_probs = greedy.view(torch.int8), has_draft_probs.view(torch.int8)
    _accept_kernel[(B,)](
        draft_tokens,
        draft_tokens.stride(0),
        draft_lens,
        target,
        target.stride(0),
        greedy,
        draft_probs,
        draft_probs.stride(0),
        has_draft_probs,
        u_accept,
        u_accept.stride(0) if u_accept.dim() > 1 else 0,
        u_final,
        accepted,
        nxt,
        B,
        target.shape[-1],
        BLOCK_B=max(16, triton.next_power_of_2(B)),
        BLOCK_V=min(block_v, triton.next_power_of_2(target.shape[-1])),
        num_warps=NUM_WARPS,
    )
    return accepted, nxt


def _unit_stride(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()
