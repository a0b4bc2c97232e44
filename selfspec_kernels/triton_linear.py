"""Batch-invariant linear layers in Triton: `x @ w.T + bias`, and fused variants.

Why: drafting is exact only if verifying k drafted tokens in one pass gives each token
the same bits as decoding it alone. cuBLAS picks its kernel, tile shape and split-K by
the number of rows, so a 5-row product rounds differently from a 1-row one, and greedy
output with drafting would drift from drafting off on a GPU. PyTorch's CUDA reductions
(`vector_norm`, `mean`) choose their thread layout by the number of rows too, so the
RMSNorm is ours as well: fused into the product with `norm=`, or alone in
`selfspec_kernels.triton_norm`.

Here row r of a result depends only on row r of the input and on the weights, bit for
bit, whatever M is and wherever the row sits in the pass:

- tile shapes are a function of the weight's shape and the device, never of M;
- each program walks K in one fixed order, BLOCK_K at a time, accumulating in float32
  (no split-K, no atomics), and writes its tile once, in the input's dtype;
- M is not specialised on (`do_not_specialize`), so one compiled kernel serves all M;
- rows past M and columns past K are loaded as zeros, which add exact zeros.

On the GPU a product is `tl.dot` on the tensor cores (bfloat16 or float16 in, float32
accumulated), or in plain float32 for float32 or mixed inputs. Under `TRITON_INTERPRET=1`
the kernels run on CPU tensors (the tests do): there a product is a float32 multiply and
sum over K, since the interpreter's `dot` is a slow Python loop and wrong in bfloat16,
and tiles are large, since the interpreter's cost is per operation of each program.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from selfspec_kernels.triton_common import check_device, interpreting, unit_stride

Norm = tuple[torch.Tensor | None, float]  # (gain or None, n * eps), as `cpu_linear.Norm`


@dataclass(frozen=True)
class Tiles:
    """One kernel configuration. A weight must be multiplied with the same tiles in every
    pass, or its rows round differently: `tiles_for` chooses them from its shape alone."""

    block_m: int
    block_n: int
    block_k: int
    num_warps: int = 4
    num_stages: int = 3


# GPU: 16 rows (the smallest tensor-core tile), so a decode step wastes little; narrow
# columns for narrow matrices, so a one-row product over 4096 outputs still spreads its
# weight reads over 128 programs. Chosen by reasoning, not yet by measurement on a GPU.
CUDA_NARROW = Tiles(16, 32, 128, num_warps=4, num_stages=4)
CUDA_WIDE = Tiles(16, 64, 64, num_warps=4, num_stages=4)
# The interpreter costs about half a millisecond per operation of a program, whatever
# its size, so a call on the test models (hidden size 64) is one program per 32 rows:
# about 10 ms on a 2-core machine.
INTERPRETER_ROWS = 32
INTERPRETER_ELEMENTS = 1 << 20  # Triton's largest block: rows * columns * K per product


def tiles_for(n: int, k: int, swiglu: bool = False) -> Tiles:
    """The tiles for a product of `n` outputs over `k` inputs (SwiGLU: `n` outputs of a
    `[2n, k]` weight), on this process's device."""
    if interpreting():
        block_k = min(triton.next_power_of_2(k), 128)
        widest = INTERPRETER_ELEMENTS // (INTERPRETER_ROWS * block_k * (1 + swiglu))
        return Tiles(INTERPRETER_ROWS, min(triton.next_power_of_2(n), widest), block_k)
    return CUDA_NARROW if n <= 8192 else CUDA_WIDE


@triton.jit(do_not_specialize=["M"])
def _linear_kernel(
    x_ptr,
    w_ptr,
    bias_ptr,
    other_ptr,
    gain_ptr,
    out_ptr,
    M,
    N,
    K,
    n_eps,
    stride_xm,
    stride_wn,
    stride_om,
    stride_out,
    HAS_BIAS: tl.constexpr,
    HAS_OTHER: tl.constexpr,
    SWIGLU: tl.constexpr,
    NORM: tl.constexpr,
    HAS_GAIN: tl.constexpr,
    F32: tl.constexpr,
    SUM: tl.constexpr,
    EVEN_K: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_W: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    # int64 indices: no overflow on large matrices, and no overflow checks (which the
    # interpreter makes on every int32 operation, at a cost).
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = (rows < M)[:, None]
    if SWIGLU:  # gate row n and up row N + n side by side; split after the product
        w_rows = tl.reshape(cols[:, None] + tl.arange(0, 2)[None, :] * N, (BLOCK_W,))
        w_ok = (w_rows < 2 * N)[:, None]
    else:
        w_rows = cols
        w_ok = (cols < N)[:, None]
    ks = tl.arange(0, BLOCK_K)[None, :]
    x_ptrs = x_ptr + rows[:, None] * stride_xm + ks
    w_ptrs = w_ptr + w_rows[:, None] * stride_wn + ks  # a [BLOCK_W, BLOCK_K] tile of w
    g_ptrs = gain_ptr + ks
    acc = tl.zeros((BLOCK_M, BLOCK_W), tl.float32)
    sumsq = tl.zeros((BLOCK_M,), tl.float32)
    for k0 in range(0, K, BLOCK_K):
        if EVEN_K:
            x = tl.load(x_ptrs, mask=row_ok, other=0.0)
            w = tl.load(w_ptrs, mask=w_ok, other=0.0)
        else:
            k_ok = ks < K - k0
            x = tl.load(x_ptrs, mask=row_ok & k_ok, other=0.0)
            w = tl.load(w_ptrs, mask=w_ok & k_ok, other=0.0)
        if NORM:
            xf = x.to(tl.float32)
            sumsq += tl.sum(xf * xf, 1)
            if HAS_GAIN:  # rounded to x's dtype: what the tensor cores take
                g = tl.load(g_ptrs, mask=ks < K - k0, other=0.0).to(tl.float32)
                x = (xf * g).to(x.dtype)
        if SUM:  # the interpreter: its `dot` is a slow Python loop, and wrong in bfloat16
            acc += tl.sum(x.to(tl.float32)[:, None, :] * w.to(tl.float32)[None, :, :], 2)
        elif F32:  # float32 throughout: tensor-core TF32 would lose what the reference keeps
            acc = tl.dot(x.to(tl.float32), tl.trans(w.to(tl.float32)), acc, input_precision="ieee")
        else:
            acc = tl.dot(x, tl.trans(w), acc)
        x_ptrs += BLOCK_K
        w_ptrs += BLOCK_K
        g_ptrs += BLOCK_K
    if NORM:  # the norm's scale is per row: applied once, after the product
        acc *= tl.rsqrt(sumsq + n_eps)[:, None]
    if SWIGLU:
        gate, up = tl.split(tl.reshape(acc, (BLOCK_M, BLOCK_N, 2)))
        acc = gate * tl.sigmoid(gate) * up
    if HAS_BIAS:
        acc += tl.load(bias_ptr + cols, mask=cols < N, other=0.0).to(tl.float32)[None, :]
    out_ok = row_ok & (cols < N)[None, :]
    if HAS_OTHER:
        other_ptrs = other_ptr + rows[:, None] * stride_om + cols[None, :]
        acc += tl.load(other_ptrs, mask=out_ok, other=0.0).to(tl.float32)
    out = acc.to(out_ptr.dtype.element_ty)
    tl.store(out_ptr + rows[:, None] * stride_out + cols[None, :], out, mask=out_ok)


def linear(
    x: torch.Tensor,
    w: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    norm: Norm | None = None,
    tiles: Tiles | None = None,
) -> torch.Tensor:
    """`x @ w.T + bias` for `x [..., K]`, `w [N, K]`, in x's dtype. `norm`: (gain or None,
    n_eps) applies the RMSNorm `x * rsqrt(n_eps + sum(x**2)) * gain` before the product."""
    return _run(x, w, bias=bias, norm=norm, tiles=tiles)


def linear_add(
    x: torch.Tensor,
    w: torch.Tensor,
    other: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    tiles: Tiles | None = None,
) -> torch.Tensor:
    """`x @ w.T + bias + other` (a residual), added in float32 and rounded once."""
    return _run(x, w, bias=bias, other=other, tiles=tiles)


def linear_swiglu(
    x: torch.Tensor, w: torch.Tensor, *, norm: Norm | None = None, tiles: Tiles | None = None
) -> torch.Tensor:
    """`silu(x @ gate.T) * (x @ up.T)` for `w = [gate; up]` (`[2I, K]`), in float32 until
    the one rounding to x's dtype; `norm` as in `linear`."""
    return _run(x, w, norm=norm, swiglu=True, tiles=tiles)


def _run(x, w, *, bias=None, other=None, norm=None, swiglu=False, tiles=None) -> torch.Tensor:
    K = x.shape[-1]
    n = w.shape[0] // 2 if swiglu else w.shape[0]
    _check(x, w, bias, swiglu)
    x2 = unit_stride(x.reshape(-1, K))
    w = unit_stride(w)
    M = x2.shape[0]
    out = torch.empty(M, n, dtype=x.dtype, device=x.device)
    if M == 0:
        return out.view(*x.shape[:-1], n)
    other2 = None if other is None else unit_stride(other.reshape(M, n))
    gain, n_eps = norm if norm is not None else (None, 0.0)
    t = tiles or tiles_for(n, K, swiglu)
    grid = (triton.cdiv(M, t.block_m), triton.cdiv(n, t.block_n))
    _linear_kernel[grid](
        x2,
        w,
        x2 if bias is None else bias,  # unused pointers get any tensor
        x2 if other2 is None else other2,
        x2 if gain is None else gain,
        out,
        M,
        n,
        K,
        float(n_eps),
        x2.stride(0),
        w.stride(0),
        0 if other2 is None else other2.stride(0),
        out.stride(0),
        HAS_BIAS=bias is not None,
        HAS_OTHER=other2 is not None,
        SWIGLU=swiglu,
        NORM=norm is not None,
        HAS_GAIN=gain is not None,
        F32=x.dtype != w.dtype or x.dtype == torch.float32,
        SUM=interpreting(),
        EVEN_K=K % t.block_k == 0,
        BLOCK_M=t.block_m,
        BLOCK_N=t.block_n,
        BLOCK_W=t.block_n * (2 if swiglu else 1),
        BLOCK_K=t.block_k,
        num_warps=t.num_warps,
        num_stages=t.num_stages,
    )
    return out.view(*x.shape[:-1], n)


def linear_reference(
    x: torch.Tensor,
    w: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    norm: Norm | None = None,
    other: torch.Tensor | None = None,
    swiglu: bool = False,
) -> torch.Tensor:
    """What the kernels compute, in float32 PyTorch, rounded once to x's dtype at the end
    (the gain is applied in x's dtype, as the kernel feeds the tensor cores)."""
    xf = x.float()
    if norm is not None:
        gain, n_eps = norm
        scale = torch.rsqrt(n_eps + xf.pow(2).sum(-1, keepdim=True))
        if gain is not None:
            xf = (xf * gain.float()).to(x.dtype).float()
    y = xf @ w.float().T
    if norm is not None:
        y = y * scale
    if bias is not None:
        y = y + bias.float()
    if swiglu:
        gate, up = y.chunk(2, -1)
        y = F.silu(gate) * up
    if other is not None:
        y = y + other.float()
    return y.to(x.dtype)


def _check(x: torch.Tensor, w: torch.Tensor, bias, swiglu: bool) -> None:
    check_device(x)
    if w.dim() != 2 or w.shape[1] != x.shape[-1]:
        raise ValueError(
            f"w must be [N, {x.shape[-1]}] for x {tuple(x.shape)}, got {tuple(w.shape)}"
        )
    if swiglu and (w.shape[0] % 2 or bias is not None):
        raise ValueError("SwiGLU takes w = [gate; up] with an even number of rows and no bias")
    if bias is not None and bias.shape != (w.shape[0],):
        raise ValueError(f"bias must be [{w.shape[0]}], got {tuple(bias.shape)}")
