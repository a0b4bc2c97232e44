"""A linear layer on GGUF quantized weights, as the file stores them, for small batches on
x86 CPUs with AVX2, FMA and F16C.

`y = x @ w.T` with `x` float32 `[m, K]`, `y` float32 `[m, N]` and `w` in one of ggml's
block formats (`Format`), each row of `K` weights a run of blocks:

- Q8_0, Q4_0, Q4_1, Q5_0, Q5_1: blocks of 32 weights, a float16 scale `d` (and for the
  `_1` formats a float16 minimum `m`) and 32 small integers `q` (Q5's fifth bits in 4
  bytes `qh`); the weight is `d * (q - zero)` or `d * q + m`.
- Q4_K (144 bytes) and Q5_K (176): super-blocks of 256 weights, 8 sub-blocks of 32.
  Float16 `d` and `dmin`, 12 bytes packing a 6-bit scale `sc` and a 6-bit min `mn` per
  sub-block (as ggml's `get_scale_min_k4`), for Q5_K 32 bytes `qh` (bit `s` of byte `l`:
  weight `l` of sub-block `s`'s fifth bit), and 128 bytes of nibbles, sub-blocks `2i` and
  `2i + 1` sharing 32 bytes (low nibbles, high nibbles); the weight is
  `d * sc * q - dmin * mn`.
- Q6_K (210 bytes): super-blocks of 256 weights, 128 bytes `ql` of low nibbles, 64 bytes
  `qh` of 2-bit high parts, an int8 scale `sc` per 16 weights, and float16 `d` last; the
  weight is `d * sc * (q - 32)`.

Decoding a few tokens at a time is bound by reading the weights, and Q4_1 is 0.625 bytes
a weight (Q4_K 0.5625) where bfloat16 is 2: the kernel reads each block once for all `m`
rows of `x`, dequantizes it in registers, 32 weights at a time (ggml's values; the K
formats' `d * sc` and `dmin * mn` as ggml rounds them, then one FMA a weight) and
accumulates `weight * x` in float32 with FMA. The activations are not quantized
(llama.cpp quantizes them to 8 bits), so the only error is the weights' own. The price is
arithmetic: on a Zen 3 core a block's dequantization costs about twice what widening
bfloat16 does, so the kernel gains where the weights stream from memory (a model larger
than the caches), and loses to `cpu_linear` on a matrix that sits in cache.

Layout: `Quantized.data` is uint8 `[rows, (K / block) * nbytes]`, each row its blocks as
the GGUF stores them; nothing is repacked at load. The C++ side is told the format (its
ggml type) with each matrix: row lengths can't tell the formats apart (a Q4_K row is as
long as a Q4_0 one). `K` is a multiple of the block, 256 for the K formats. With
`swiglu=True` the matrix is `[gate; up]` (rows `i` and `n + i` make output `i`) and the
kernel returns `silu(x @ gate.T) * (x @ up.T)`. As in `cpu_linear`, the kernel can apply
the RMSNorm before the product (`norm`) and add a residual after it (`linear_q_add`).

Row invariance: row `r` of the result depends only on `x[r]` and `w`, bit for bit,
whatever `m` is, whatever the other rows hold and however the work is split among
threads. Each output `(r, n)` has four 8-lane accumulators, one per eighth of 32 weights,
that take the weights 32 at a time in order; they are summed in one fixed order at the
end. Run to run the result is deterministic.

Work: the outputs are handed to `torch.get_num_threads()` OpenMP threads in blocks of 16,
in guided chunks. For one or two rows of x a weight row is dequantized straight into
registers; for more, 1024 weights at a time are dequantized once, by rows 0-1, and kept
in L1 for the other rows.

The C++ source is `selfspec_kernels/csrc/quant.cpp`, built with the other CPU kernels
(`cpu_build`). `available()` says whether it could be built here; it never raises.
`Quantized.unpack` (and `rows`) dequantize in the same C++, with the two roundings of
gguf's own `dequantize` where the products fuse them: prefill multiplies by these.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from selfspec_kernels.cpu_build import CPU
from selfspec_kernels.cpu_linear import Norm

__all__ = [
    "FORMATS",
    "Format",
    "Quantized",
    "available",
    "format_of",
    "linear_q",
    "linear_q_add",
    "linear_q_swiglu",
    "quantized",
    "unavailable_reason",
]


@dataclass(frozen=True)
class Format:
    """One GGUF block format: `block` weights in `nbytes` bytes."""

    name: str
    ggml_type: int  # gguf.GGMLQuantizationType's value
    block: int
    nbytes: int

    @property
    def has_min(self) -> bool:
        """A 32-weight format whose weights are `d * q + m` (else `d * (q - zero)`)."""
        return self.name.endswith("_1")

    @property
    def bits(self) -> int:
        return int(self.name[1])


FORMATS: dict[str, Format] = {
    f.name: f
    for f in (
        Format("q8_0", 8, 32, 34),
        Format("q4_0", 2, 32, 18),
        Format("q4_1", 3, 32, 20),
        Format("q5_0", 6, 32, 22),
        Format("q5_1", 7, 32, 24),
        Format("q4_k", 12, 256, 144),
        Format("q5_k", 13, 256, 176),
        Format("q6_k", 14, 256, 210),
    )
}
_BY_TYPE = {f.ggml_type: f for f in FORMATS.values()}


def format_of(ggml_type: int) -> Format | None:
    """The format of a `gguf.GGMLQuantizationType` value, or None when the kernel lacks it."""
    return _BY_TYPE.get(int(ggml_type))


def available() -> bool:
    """True when the kernel runs here: AVX2 and FMA, and the extension builds. Never raises."""
    return CPU.available()


def unavailable_reason() -> str | None:
    """Why `available()` is False (after calling it), or None."""
    return CPU.unavailable_reason()


@dataclass(frozen=True)
class Quantized:
    """A matrix in a GGUF block format: `data` uint8 `[rows, (k / block) * nbytes]`, each
    row its blocks as stored. `n` is the number of outputs: the rows, or with `swiglu`
    the gate rows (`data` is `[gate; up]`, 2n rows). Made by `quantized`, which checks."""

    data: torch.Tensor
    format: Format
    n: int
    k: int
    swiglu: bool = False

    def unpack(self) -> torch.Tensor:
        """The matrix, float32 `[rows, k]`, dequantized: the values of gguf's own
        `dequantize`, bit for bit."""
        return CPU.ops().unpack_q(self.data, self.format.ggml_type, self.k)

    def rows(self, index: torch.Tensor) -> torch.Tensor:
        """Rows `index` (1-D ids into `data`) dequantized, float32 `[len(index), k]`."""
        return CPU.ops().unpack_q(self.data[index.long()], self.format.ggml_type, self.k)


def quantized(data: torch.Tensor, fmt: Format, k: int, *, swiglu: bool = False) -> Quantized:
    """`data` as a `Quantized` matrix of `k` columns, after checking that it is one."""
    if data.dtype != torch.uint8 or data.dim() != 2:
        raise ValueError(
            f"quantized weights are a 2-D uint8 tensor, got {tuple(data.shape)} {data.dtype}"
        )
    if k <= 0 or k % fmt.block:
        raise ValueError(f"{fmt.name}: K must be a positive multiple of {fmt.block}, got {k}")
    row_bytes = k // fmt.block * fmt.nbytes
    if data.shape[1] != row_bytes:
        raise ValueError(
            f"{fmt.name}: a row of {k} weights is {row_bytes} bytes, got {data.shape[1]}"
        )
    if not data.is_contiguous():
        raise ValueError("quantized weights must be contiguous")
    rows = data.shape[0]
    if swiglu and rows % 2:
        raise ValueError(f"a [gate; up] matrix has an even number of rows, got {rows}")
    return Quantized(data, fmt, rows // 2 if swiglu else rows, k, swiglu)


def linear_q(
    x: torch.Tensor, w: Quantized, bias: torch.Tensor | None = None, *, norm: Norm | None = None
) -> torch.Tensor:
    """`x @ w.T (+ bias)`: x float32 [m, K], bias float32 [N]. `norm = (gain, n_eps)` as in
    `cpu_linear.linear_bf16`: each row of x first scaled by `1 / sqrt(n_eps + sum(x ** 2))`
    and by `gain` (float32 [K], or None)."""
    _check(x, w, swiglu=False)
    gain, n_eps = norm if norm is not None else (None, 0.0)
    return CPU.ops().linear_q(
        x, w.data, w.format.ggml_type, w.n, bias, norm is not None, gain, n_eps
    )


def linear_q_add(
    x: torch.Tensor, w: Quantized, residual: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """`linear_q(x, w, bias) + residual`, residual float32 [m, N], in one pass."""
    _check(x, w, swiglu=False)
    return CPU.ops().linear_q_add(x, w.data, w.format.ggml_type, w.n, bias, residual)


def linear_q_swiglu(x: torch.Tensor, w: Quantized, *, norm: Norm | None = None) -> torch.Tensor:
    """`silu(x @ gate.T) * (x @ up.T)` for `w = quantized([gate; up], swiglu=True)`, in
    one pass."""
    _check(x, w, swiglu=True)
    gain, n_eps = norm if norm is not None else (None, 0.0)
    return CPU.ops().linear_q_swiglu(
        x, w.data, w.format.ggml_type, w.n, norm is not None, gain, n_eps
    )


def _check(x: torch.Tensor, w: Quantized, *, swiglu: bool) -> None:
    if w.swiglu != swiglu:
        raise ValueError("linear_q_swiglu takes a matrix made with swiglu=True, and only it")
    if x.dim() != 2 or x.shape[1] != w.k or x.dtype != torch.float32:
        raise ValueError(f"x is {tuple(x.shape)} {x.dtype}: the weights take float32 [m, {w.k}]")
