"""KV append in Triton: the new tokens' keys and values into their pool slots.

The reference is `kv_cache.index_copy_(0, slots, kv)` (`selfspec_kernels.attention.write_kv`).
One launch covers a whole batch of ragged sequences, since every token already knows
its flat slot. Nothing is needed for the prefix-layer reuse of drafting: a draft writes
the KV of the layers below its first skipped sublayer into the same slots verification
reads, and verification writes only the layers it runs.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK = 1024  # row elements per program


@triton.jit
def _append_kernel(
    kv_ptr, slots_ptr, cache_ptr, stride_kv, stride_cache, width, BLOCK: tl.constexpr
):
    token = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    ok = cols < width
    slot = tl.load(slots_ptr + token).to(tl.int64)
    row = tl.load(kv_ptr + token.to(tl.int64) * stride_kv + cols, mask=ok)
    tl.store(cache_ptr + slot * stride_cache + cols, row, mask=ok)


def append_kv(kv_cache: torch.Tensor, slots: torch.Tensor, kv: torch.Tensor) -> None:
    """Write row t of `kv` (`[T, 2 * kv_dim]`) to row `slots[t]` of `kv_cache`.

    Slots must be distinct, as the engine's are (each new token owns its slot)."""
    T, width = kv.shape
    if T == 0:
        return
    if kv.stride(1) != 1:
        kv = kv.contiguous()
    kv = kv.to(kv_cache.dtype)
    grid = (T, triton.cdiv(width, BLOCK))
    _append_kernel[grid](kv, slots, kv_cache, kv.stride(0), kv_cache.stride(0), width, BLOCK=BLOCK)
