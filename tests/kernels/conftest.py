"""Kernel tests run the Triton kernels on the GPU when there is one, and otherwise in
Triton's interpreter on CPU tensors. The interpreter is chosen when a kernel is defined,
so it is switched on here, before any test module imports one."""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
