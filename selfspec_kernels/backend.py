"""The one place that picks a model's compute path: dtype, linear products, attention.

A backend is chosen once per engine from what the hardware offers, or forced with
`backend=` (`Engine.from_pretrained`), `--backend` or `SELFSPEC_BACKEND`:

- `cpu`: our AVX2 kernels (`cpu_linear`, `cpu_attention`, `cpu_layers`), float32
  arithmetic on bfloat16 weights, which stay bfloat16 in memory.
- `onednn`: oneDNN's packed products and our attention kernel, in float32; bfloat16
  arithmetic (AMX, AVX-512 BF16) where the CPU has it, with PyTorch's attention.
- `torch`: `F.linear` and PyTorch's attention, in the dtype asked for (bfloat16 too,
  on any CPU: slowly).
- `triton`: `triton_linear`, `triton_norm` and `paged_attention`, on CUDA, or on the
  CPU in Triton's interpreter (`TRITON_INTERPRET=1`, for tests).

Greedy exactness needs every few-row product and attention to give each row the same
bits whatever else is in the pass. Our kernels and the Triton ones are written so;
oneDNN and PyTorch are not (measured on a Xeon with AMX: oneDNN's float32 product with
K = 1536 changes its rounding from 2 rows on, its bfloat16 one above 32 rows), so those
backends run few-row passes one row, and one query, at a time: slower, exact.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import torch

log = logging.getLogger(__name__)

NAMES = ("cpu", "onednn", "torch", "triton")
ENV = "SELFSPEC_BACKEND"


@dataclass(frozen=True)
class Backend:
    """How one model computes: `linear` and `attention` name the implementations."""

    name: str
    device: str  # "cpu" or "cuda"
    dtype: torch.dtype  # weights as asked (the model's values are rounded to it)
    compute: torch.dtype  # activations and arithmetic
    linear: str  # "cpu", "onednn", "torch" or "triton"
    attention: str  # "cpu", "torch" or "triton"
    quantized: bool = False  # a GGUF's matrices in their block formats (`cpu` only)

    @property
    def rowwise(self) -> bool:
        """Few-row products one row at a time (see the module docstring)."""
        return self.linear in ("onednn", "torch")

    def describe(self) -> dict[str, str]:
        """What the backend is, as logged, reported and recorded by benchmarks."""
        return {
            "backend": self.name,
            "device": self.device,
            "weights": "gguf" if self.quantized else _name(self.dtype),
            "compute": _name(self.compute),
            "linear": self.linear,
            "attention": self.attention,
            "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "native_bf16": str(native_bf16(torch.device(self.device))).lower(),
        }

    def __str__(self) -> str:
        d = self.describe()
        return (
            f"{self.name} ({d['linear']} products, {d['attention']} attention, "
            f"{d['weights']} weights, {d['compute']} arithmetic, on {d['device']})"
        )


def choose(dtype: torch.dtype, device: str | torch.device, name: str | None = None) -> Backend:
    """The backend for `dtype` on `device`: `name`, else `SELFSPEC_BACKEND`, else the
    fastest this machine can run. Raises ValueError, saying why, for one it can't."""
    device = torch.device(device).type
    name = name or os.environ.get(ENV) or _default(dtype, device)
    if name not in NAMES:
        raise ValueError(f"backend must be one of {', '.join(NAMES)}, got {name!r}")
    reason = unavailable(name, dtype, device)
    if reason is not None:
        raise ValueError(f"backend {name!r} can't run here: {reason}")
    return _build(name, dtype, device)


def runnable(dtype: torch.dtype, device: str = "cpu") -> list[str]:
    """The backends that can run `dtype` on `device` on this machine."""
    return [n for n in NAMES if unavailable(n, dtype, torch.device(device).type) is None]


def unavailable(name: str, dtype: torch.dtype, device: str) -> str | None:
    """None when backend `name` runs `dtype` on `device` here, else why not."""
    if name == "cpu":
        from selfspec_kernels.cpu_build import CPU

        if device != "cpu":
            return "it runs on the CPU only"
        if dtype != torch.bfloat16:
            return "its kernels multiply bfloat16 weights; use --dtype bfloat16 or another backend"
        return None if CPU.available() else f"CPU kernels unavailable: {CPU.unavailable_reason()}"
    if name == "onednn":
        if device != "cpu":
            return "it runs on the CPU only"
        if dtype not in (torch.float32, torch.bfloat16):
            return "oneDNN's packed products take float32 or bfloat16"
        return None if torch.backends.mkldnn.is_available() else "PyTorch was built without it"
    if name == "triton":
        return _triton_unavailable(device)
    return None


def native_bf16(device: torch.device) -> bool:
    """Whether bfloat16 arithmetic runs at full speed (every GPU; CPUs with AVX512_BF16
    or AMX)."""
    return device.type != "cpu" or torch.ops.mkldnn._is_mkldnn_bf16_supported()


def _default(dtype: torch.dtype, device: str) -> str:
    if device != "cpu":
        return "triton" if _triton_unavailable(device) is None else "torch"
    if dtype == torch.bfloat16 and unavailable("cpu", dtype, device) is None:
        return "cpu"
    if dtype in (torch.float32, torch.bfloat16) and unavailable("onednn", dtype, device) is None:
        return "onednn"
    return "torch"


def _build(name: str, dtype: torch.dtype, device: str) -> Backend:
    compute = dtype
    attention = {"cpu": "cpu", "triton": "triton"}.get(name, "torch")
    if name == "cpu":
        compute = torch.float32  # activations widen; weights stay bfloat16
    elif name == "onednn":
        if dtype == torch.bfloat16 and not native_bf16(torch.device(device)):
            compute = torch.float32  # emulated bfloat16 is far slower than float32
        attention = "cpu" if compute == torch.float32 and _cpu_kernels() else "torch"
    return Backend(name, device, dtype, compute, name, attention)


def _cpu_kernels() -> bool:
    from selfspec_kernels.cpu_build import CPU

    return CPU.available()


def _triton_unavailable(device: str) -> str | None:
    if os.environ.get("SELFSPEC_KERNELS") == "reference":
        return "switched off by SELFSPEC_KERNELS=reference"
    try:
        import triton
    except ImportError:
        return "triton is not installed"
    if device == "cpu" and not triton.knobs.runtime.interpret:
        return "on the CPU, Triton runs only in its interpreter: set TRITON_INTERPRET=1 (slow)"
    return None


def _name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")
