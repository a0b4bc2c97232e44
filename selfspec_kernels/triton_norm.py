"""A batch-invariant RMSNorm in Triton, for where it is not fused into a product
(`selfspec_kernels.triton_linear`'s `norm=`): Qwen3's norms of each head's q and k.

PyTorch's CUDA reductions choose their thread layout by the number of rows, so a row
would round differently in a 1-row decode and an 8-row verification. Here a program
takes a fixed number of rows and sums each row's squares in one fixed order, BLOCK_D
at a time in float32, so row r of the result depends only on row r of the input.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from selfspec_kernels.triton_common import check_device, interpreting, unit_stride

NORM_ROWS = {"cuda": 1, "interpreter": 64}  # rows per program of `normalize`
NORM_BLOCK_D = 1024


@triton.jit(do_not_specialize=["M"])
def _normalize_kernel(
    x_ptr,
    gain_ptr,
    out_ptr,
    M,
    D,
    n_eps,
    stride_xm,
    stride_out,
    HAS_GAIN: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < M
    x_rows = x_ptr + rows[:, None] * stride_xm
    out_rows = out_ptr + rows[:, None] * stride_out
    sumsq = tl.zeros((BLOCK_M,), tl.float32)
    for d0 in range(0, D, BLOCK_D):
        d = d0 + tl.arange(0, BLOCK_D)
        x = tl.load(x_rows + d[None, :], mask=row_ok[:, None] & (d < D)[None, :], other=0.0)
        x = x.to(tl.float32)
        sumsq += tl.sum(x * x, 1)
    scale = tl.rsqrt(sumsq + n_eps)[:, None]
    for d0 in range(0, D, BLOCK_D):
        d = d0 + tl.arange(0, BLOCK_D)
        mask = row_ok[:, None] & (d < D)[None, :]
        y = tl.load(x_rows + d[None, :], mask=mask, other=0.0).to(tl.float32) * scale
        if HAS_GAIN:
            y *= tl.load(gain_ptr + d, mask=d < D, other=0.0).to(tl.float32)[None, :]
        tl.store(out_rows + d[None, :], y.to(out_ptr.dtype.element_ty), mask=mask)


def normalize(x: torch.Tensor, n_eps: float, gain: torch.Tensor | None = None) -> torch.Tensor:
    """The RMSNorm over the last dim as the engine writes it, `x * rsqrt(n_eps +
    sum(x**2)) * gain` (`services.engine.layers.normalize`, with `n_eps = n * eps` and the
    gain holding sqrt(n)), in float32 and rounded once to x's dtype."""
    D = x.shape[-1]
    check_device(x)
    x2 = unit_stride(x.reshape(-1, D))
    M = x2.shape[0]
    out = torch.empty(M, D, dtype=x.dtype, device=x.device)
    if M == 0:
        return out.view(x.shape)
    block_m = NORM_ROWS["interpreter" if interpreting() else "cuda"]
    block_d = min(triton.next_power_of_2(D), NORM_BLOCK_D)
    _normalize_kernel[(triton.cdiv(M, block_m),)](
        x2,
        x2 if gain is None else gain,
        out,
        M,
        D,
        float(n_eps),
        x2.stride(0),
        out.stride(0),
        HAS_GAIN=gain is not None,
        BLOCK_M=block_m,
        BLOCK_D=block_d,
    )
    return out.view(x.shape)


def normalize_reference(
    x: torch.Tensor, n_eps: float, gain: torch.Tensor | None = None
) -> torch.Tensor:
    """What `normalize` computes, in float32 PyTorch."""
    xf = x.float()
    y = xf * torch.rsqrt(n_eps + xf.pow(2).sum(-1, keepdim=True))
    return (y if gain is None else y * gain.float()).to(x.dtype)
