"""A bfloat16-weight linear layer for small batches on x86 CPUs with AVX2 and FMA.

`y = x @ w.T` with `w` bfloat16 `[N, K]`, `x` float32 `[m, K]`, `y` float32 `[m, N]`.
Decoding a few tokens at a time is bound by reading the weights, so the kernel reads
each weight from memory once for all `m` rows of `x`, widens bfloat16 to float32 in
registers (a bfloat16 is the top half of a float32) and accumulates in float32 with
FMA. PyTorch's own paths read twice the bytes (float32 weights) or redo the emulated
bfloat16 product once per row.

The weights are packed once at load (`pack`) so that the kernel reads one sequential
stream: groups of 4 rows, and within a group each step of 8 columns is one 64-byte
line holding the 4 rows' values interleaved in pairs (the numbers are the C++ side's,
read from the built module: `GROUP_ROWS`, `STEP_COLUMNS`). Packed with `swiglu=True`, the
matrix `[gate; up]` puts 2 gate rows and the 2 matching up rows in each group, and the
kernel returns `silu(x @ gate.T) * (x @ up.T)`. The kernel can also apply the RMSNorm
before the product (`norm`), and add a residual after it (`linear_bf16_add`).

Row invariance: row `r` of the result depends only on `x[r]` and `w`, bit for bit,
whatever `m` is, whatever the other rows hold and however the work is split among
threads. Each output `(r, n)` has its own 8-lane accumulator that takes the products
of `k = 0, 8, 16, ...` in order (`K` is padded with zeros to a multiple of 8) and is
summed across lanes in a fixed tree; the norm's sum of squares has one fixed order per
row too. Run to run the result is deterministic.

Work: the groups are handed to `torch.get_num_threads()` OpenMP threads in blocks of
6, in guided chunks. Within a group, rows 0 and 1 of `x` read the packed stream
(prefetched 1 KiB ahead) with 8 accumulators in registers. With more rows, each chunk of
32 k-steps that rows 0-1 widen is kept in L1 as float32, and the other rows take it from
there 3 at a time (12 accumulators): the widening is done once, not once per 2 rows,
and the stream is read at an even pace while the arithmetic runs.

The C++ source, `selfspec_kernels/csrc/linear.cpp`, is compiled on first use
(`cpu_build`).
`available()` says whether it could be built here; it never raises.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from selfspec_kernels.cpu_build import CPU

__all__ = [
    "Packed",
    "available",
    "unavailable_reason",
    "pack",
    "linear_bf16",
    "linear_bf16_add",
    "linear_bf16_swiglu",
    "linear_bf16_reference",
]


def available() -> bool:
    """True when the kernel runs here: AVX2 and FMA, and the extension builds. Never raises."""
    return CPU.available()


def unavailable_reason() -> str | None:
    """Why `available()` is False (after calling it), or None."""
    return CPU.unavailable_reason()


@dataclass(frozen=True)
class Packed:
    """A bfloat16 matrix in the kernel's layout: `data` is `[groups, ceil(k / S), R / 2,
    S, 2]` for groups of R rows and k-steps of S columns (`GROUP_ROWS`, `STEP_COLUMNS`).

    `n` is the number of outputs: the matrix's rows, or for `swiglu` its gate rows."""

    data: torch.Tensor
    n: int
    k: int
    swiglu: bool = False

    def unpack(self) -> torch.Tensor:
        """The matrix `[rows, k]` as it was given to `pack`."""
        g, ks, pairs, step = self.data.shape[:4]
        w = self.data.permute(0, 2, 4, 1, 3).reshape(g * 2 * pairs, ks * step)[:, : self.k]
        if not self.swiglu:
            return w[: self.n]
        w = w.view(g, 2, pairs, self.k).transpose(0, 1).reshape(2, g * pairs, self.k)
        return w[:, : self.n].reshape(2 * self.n, self.k)

    def rows(self, index: torch.Tensor) -> torch.Tensor:
        """Rows `index` (1-D ids) of the matrix, unpacked, without unpacking the rest."""
        if self.swiglu:
            raise ValueError("rows of a [gate; up] matrix: unpack it instead")
        index, group_rows = index.long(), 2 * self.data.shape[2]
        picked = self.data[index // group_rows, :, (index % group_rows) // 2, :, index % 2]
        return picked.flatten(1)[:, : self.k].contiguous()  # [len, k]; none: [0, k]


def pack(w: torch.Tensor, *, swiglu: bool = False) -> Packed:
    """Pack a bfloat16 `[N, K]` matrix for the kernel; with `swiglu`, `w` is `[gate; up]`
    (2I rows) and group g holds gate rows 2g, 2g+1 and up rows 2g, 2g+1. Needs the built
    module (the layout is its); raises RuntimeError where it can't be built."""
    if w.dtype != torch.bfloat16 or w.dim() != 2:
        raise ValueError(f"pack takes a 2-D bfloat16 matrix, got {tuple(w.shape)} {w.dtype}")
    ops = CPU.ops()
    group_rows, step = ops.GROUP_ROWS, ops.STEP_COLUMNS
    rows, k = w.shape
    if swiglu:
        if rows % 2:
            raise ValueError(f"a [gate; up] matrix has an even number of rows, got {rows}")
        n, half = rows // 2, group_rows // 2  # gate (and up) rows per group
        groups = -(-n // half)
        halves = F.pad(w.view(2, n, k), (0, 0, 0, half * groups - n))  # [2, half * groups, k]
        w = halves.view(2, groups, half, k).transpose(0, 1).reshape(group_rows * groups, k)
    else:
        n = rows
    groups, ks = -(-w.shape[0] // group_rows), -(-k // step)
    w = F.pad(w, (0, step * ks - k, 0, group_rows * groups - w.shape[0]))
    data = w.view(groups, group_rows // 2, 2, ks, step).permute(0, 3, 1, 4, 2).contiguous()
    return Packed(data, n, k, swiglu)


Norm = tuple[torch.Tensor | None, float]  # (gain or None, n * eps): see `linear_bf16`


def linear_bf16(
    x: torch.Tensor, w: Packed, bias: torch.Tensor | None = None, *, norm: Norm | None = None
) -> torch.Tensor:
    """`x @ w.T (+ bias)`: x float32 [m, K], bias float32 [N]. With `norm = (gain, n_eps)`
    each row of x is first scaled by `1 / sqrt(n_eps + sum(x ** 2))` and by `gain`
    (float32 [K], or None): an RMSNorm with `n_eps = K * eps` and a gain times sqrt(K)."""
    _packed_for(w, swiglu=False)
    gain, n_eps = norm if norm is not None else (None, 0.0)
    return CPU.ops().linear_bf16(x, w.data, w.n, bias, norm is not None, gain, n_eps)


def linear_bf16_add(
    x: torch.Tensor, w: Packed, residual: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """`linear_bf16(x, w, bias) + residual`, residual float32 [m, N], in one pass."""
    _packed_for(w, swiglu=False)
    return CPU.ops().linear_bf16_add(x, w.data, w.n, bias, residual)


def linear_bf16_swiglu(x: torch.Tensor, w: Packed, *, norm: Norm | None = None) -> torch.Tensor:
    """`silu(x @ gate.T) * (x @ up.T)` for `w = pack([gate; up], swiglu=True)`, in one pass."""
    _packed_for(w, swiglu=True)
    gain, n_eps = norm if norm is not None else (None, 0.0)
    return CPU.ops().linear_bf16_swiglu(x, w.data, w.n, norm is not None, gain, n_eps)


def _packed_for(w: Packed, *, swiglu: bool) -> None:
    if w.swiglu != swiglu:
        raise ValueError("linear_bf16_swiglu takes a matrix packed with swiglu=True, and only it")


def linear_bf16_reference(
    x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """The plain PyTorch definition the kernel is tested against (w unpacked)."""
    y = x @ w.float().T
    return y if bias is None else y + bias
