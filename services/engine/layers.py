"""A decoder layer's parts as a model's backend runs them, and which of them a pass runs.

`Linear` is a matrix prepared once at load for the backend's product (`selfspec_kernels.backend`),
`Norm` an RMSNorm, `Layer` one decoder layer's norms and matrices; `LayerPlan` says which
sublayers a pass skips (a draft). `services.engine.model` loads these from a checkpoint
and runs the forward pass over them.
"""

from __future__ import annotations

import functools
import importlib
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from selfspec_kernels import cpu_linear, cpu_quant

__all__ = ["FULL", "Layer", "LayerPlan", "Linear", "Norm", "normalize", "rms_norm", "triton"]


@dataclass(frozen=True)
class Norm:
    """An RMSNorm as `normalize` computes it, then the gain (which holds the sqrt(n)
    `normalize` leaves out; None when folded into the next product's weights)."""

    gain: torch.Tensor | None
    n_eps: float

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        x = normalize(x, self.n_eps)
        return x if self.gain is None else x * self.gain


class Linear:
    """A weight prepared once at load for its backend's product (`selfspec_kernels.backend`).

    `cpu`: our AVX2 kernel's layout, which reads each bfloat16 weight once for all rows
    and fuses the RMSNorm before the product too; `onednn`: oneDNN's packed layout, which
    reads weights faster than `F.linear` and fuses the op that follows; `torch`:
    `F.linear`; `triton`: `selfspec_kernels.triton_linear`. Our kernels and Triton's give each row
    the same result whatever the number of rows, which keeps drafting exact; oneDNN and
    `F.linear` don't, so few-row passes (`bulk` False) call them one row at a time.

    A GGUF's matrix in a block format (`cpu_quant.Quantized`) is multiplied as it is by
    our quantized kernel; for prefill it is dequantized for the pass and multiplied by
    MKL's float32 GEMM, as our bfloat16 kernel's matrices are: with many rows the product
    is compute-bound, and there the GEMM is about three times faster.

    `swiglu`: the weight is `[gate; up]`, multiplied by `swiglu()`.
    """

    def __init__(
        self,
        weight: torch.Tensor | cpu_quant.Quantized,
        bias: torch.Tensor | None = None,
        *,
        impl: str = "torch",
        swiglu: bool = False,
    ) -> None:
        self.impl = impl
        self.bias = bias
        self.weight: torch.Tensor | None = weight
        self.packed = None  # oneDNN's layout
        self.kernel: cpu_linear.Packed | cpu_quant.Quantized | None = None  # our kernels'
        if isinstance(weight, cpu_quant.Quantized):
            if impl != "cpu":
                raise ValueError(f"quantized weights run on the cpu backend, not {impl!r}")
            self.kernel, self.weight = weight, None
        elif impl == "cpu":
            self.kernel = cpu_linear.pack(weight, swiglu=swiglu)
            self.weight = None
        elif impl == "onednn":
            self.packed = torch.ops.mkldnn._reorder_linear_weight(weight, None)
            self.weight = None

    def _one(self, x: torch.Tensor, other: torch.Tensor | None = None) -> torch.Tensor:
        """`x @ W.T + bias (+ other)` in one call of oneDNN or `F.linear`."""
        if self.packed is not None:
            if other is None:
                return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")
            return torch.ops.mkldnn._linear_pointwise.binary(
                x, other, self.packed, self.bias, "add"
            )
        # Our kernel's weights widened: for prefill, where many rows make the product
        # compute-bound and MKL's float32 GEMM beats a kernel made for few rows.
        w = self.kernel.unpack().float() if self.kernel is not None else self.weight
        y = F.linear(x, w, self.bias)
        return y if other is None else y + other

    def _rows(self, x, bulk: bool, norm: Norm | None = None, other=None) -> torch.Tensor:
        """`norm(x) @ W.T + bias (+ other)` through `_one`: in one call for bulk passes,
        else one row at a time for `onednn` and `torch` (the norm too: its reduction may
        also change with the number of rows)."""
        if bulk or x.shape[0] == 1 or self.impl == "cpu":
            rows = [(x, other)]
        else:
            others = [None] * len(x) if other is None else other.split(1)
            rows = zip(x.split(1), others, strict=True)
        out = [self._one(r if norm is None else norm(r), o) for r, o in rows]
        return out[0] if len(out) == 1 else torch.cat(out)

    @property
    def quantized(self) -> bool:
        return isinstance(self.kernel, cpu_quant.Quantized)

    def _kernel(self, bulk: bool):
        """Our kernel's functions (product, add, SwiGLU) when they run this pass, else None."""
        if self.kernel is None or bulk:
            return None
        if self.quantized:
            return cpu_quant.linear_q, cpu_quant.linear_q_add, cpu_quant.linear_q_swiglu
        return cpu_linear.linear_bf16, cpu_linear.linear_bf16_add, cpu_linear.linear_bf16_swiglu

    def __call__(self, x: torch.Tensor, bulk: bool = False, norm: Norm | None = None):
        """`norm(x) @ W.T + bias`; `bulk`: many rows (prefill)."""
        if kernel := self._kernel(bulk):
            return kernel[0](x, self.kernel, self.bias, norm=_pair(norm))
        if self.impl == "triton":
            return triton("triton_linear").linear(x, self.weight, self.bias, norm=_pair(norm))
        return self._rows(x, bulk, norm)

    def add(self, x: torch.Tensor, other: torch.Tensor, bulk: bool = False) -> torch.Tensor:
        """`self(x) + other` in one op."""
        if kernel := self._kernel(bulk):
            return kernel[1](x, self.kernel, other, self.bias)
        if self.impl == "triton":
            return triton("triton_linear").linear_add(x, self.weight, other, self.bias)
        return self._rows(x, bulk, other=other)

    def swiglu(self, x: torch.Tensor, bulk: bool = False, norm: Norm | None = None):
        """`silu(norm(x) @ gate.T) * (norm(x) @ up.T)`."""
        if kernel := self._kernel(bulk):
            return kernel[2](x, self.kernel, norm=_pair(norm))
        if self.impl == "triton":
            return triton("triton_linear").linear_swiglu(x, self.weight, norm=_pair(norm))
        gate, up = self(x, bulk, norm).chunk(2, -1)
        return F.silu(gate) * up

    def rows(self, index: torch.Tensor) -> torch.Tensor | None:
        """Rows `index` of the weight, or None where oneDNN holds it."""
        if self.kernel is not None:
            return self.kernel.rows(index)
        return None if self.weight is None else self.weight[index]


def _pair(norm: Norm | None) -> cpu_linear.Norm | None:
    return None if norm is None else (norm.gain, norm.n_eps)


@functools.cache
def triton(name: str):
    """`selfspec_kernels.<name>` (`triton_linear`, `triton_norm`), imported on first use: Triton
    picks its interpreter when a kernel is defined, so only once the process has chosen
    (`TRITON_INTERPRET`)."""
    return importlib.import_module(f"selfspec_kernels.{name}")


@dataclass
class Layer:
    attn_norm: Norm
    mlp_norm: Norm
    qkv: Linear  # q and k rows permuted so RoPE is one complex product
    o: Linear
    gate_up: Linear  # [gate; up], multiplied by `swiglu`
    down: Linear
    q_norm: torch.Tensor | None = None
    k_norm: torch.Tensor | None = None

    @property
    def linears(self) -> tuple[Linear, Linear, Linear, Linear]:
        """The matrices in the order a pass reads them."""
        return self.qkv, self.o, self.gate_up, self.down


@dataclass(frozen=True)
class LayerPlan:
    """Which sublayers a pass skips. The empty plan is the full model."""

    skip_attn: frozenset[int] = field(default_factory=frozenset)
    skip_mlp: frozenset[int] = field(default_factory=frozenset)

    @property
    def first_skipped(self) -> int | None:
        """Layers before this one compute exactly what the full model does."""
        skipped = self.skip_attn | self.skip_mlp
        return min(skipped) if skipped else None


FULL = LayerPlan()


def normalize(x: torch.Tensor, n_eps: float) -> torch.Tensor:
    """RMS normalisation up to a factor sqrt(n) and the gain, which are folded into
    the next product's weights: four cheap ops instead of six."""
    s = torch.linalg.vector_norm(x, dim=-1, keepdim=True)
    return x * torch.rsqrt(torch.addcmul(torch.full_like(s, n_eps), s, s))


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight
