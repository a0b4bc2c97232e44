"""CPU tensors on transparent huge pages, for what a decode step streams from memory.

A step reads every weight once and the keys and values of every cached token. With
4 KiB pages that is a page-table walk every 4 KiB, and the hardware prefetchers stop at
each page's edge. On 2 MiB pages the matrices of a step read 8% faster here, and the
keys and values of 1000 cached tokens 13% faster (`benchmarks/engine.py`'s bandwidth
probe reads through the same kind of pages, and did not move).

`empty` asks Linux for huge pages with `madvise(MADV_HUGEPAGE)` on a 2 MiB-aligned part of
a fresh allocation before anything touches it, so the pages are huge from the first
write. Where that can't be done (not Linux, not enabled, a small tensor) the tensor is
an ordinary one: this only changes speed.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys

import torch

__all__ = ["empty", "zeros"]

HUGE_PAGE = 2 << 20
MADV_HUGEPAGE = 14


def _libc():
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    except OSError:
        return None


_LIBC = _libc()


def empty(shape: tuple[int, ...] | list[int], dtype: torch.dtype) -> torch.Tensor:
    """An uninitialised contiguous CPU tensor, on huge pages where Linux gives them."""
    numel = 1
    for n in shape:
        numel *= n
    itemsize = torch.empty((), dtype=dtype).element_size()
    if _LIBC is None or numel * itemsize < HUGE_PAGE:
        return torch.empty(shape, dtype=dtype)
    pad = HUGE_PAGE // itemsize
    raw = torch.empty(numel + pad, dtype=dtype)  # a fresh mapping: no page touched yet
    skip = (-raw.data_ptr() % HUGE_PAGE) // itemsize
    out = raw[skip : skip + numel]
    size = numel * itemsize // HUGE_PAGE * HUGE_PAGE
    _LIBC.madvise(ctypes.c_void_p(out.data_ptr()), ctypes.c_size_t(size), MADV_HUGEPAGE)
    return out.view(shape)


def zeros(shape: tuple[int, ...] | list[int], dtype: torch.dtype) -> torch.Tensor:
    """`empty`, zeroed."""
    return empty(shape, dtype).zero_()
