"""What the Python sides of the Triton kernels share: whether Triton runs in its
interpreter (`TRITON_INTERPRET=1`, on CPU tensors, for tests), and their inputs' checks."""

from __future__ import annotations

import torch
import triton


def interpreting() -> bool:
    """Whether kernels run in Triton's interpreter rather than compiled for a GPU."""
    return triton.knobs.runtime.interpret


def check_device(x: torch.Tensor) -> None:
    """Raise ValueError unless the kernels can take `x` here."""
    if not (x.is_cuda or interpreting()):
        raise ValueError("Triton kernels take CUDA tensors (or CPU ones under TRITON_INTERPRET=1)")


def unit_stride(t: torch.Tensor) -> torch.Tensor:
    """`t` with unit stride along its last dim, which the kernels assume."""
    return t if t.stride(-1) == 1 else t.contiguous()
