"""The backends a test runs on: every one, skipped with the reason where this machine
can't run it, so that every compute path is tested wherever it can run."""

from __future__ import annotations

import pytest
import torch

from selfspec_kernels import backend


def backend_params(dtypes: tuple[str, ...], names=backend.NAMES, device: str = "cpu") -> list:
    """A pytest param per (backend, dtype), id `name-dtype`, skipped with the reason
    where this machine can't run it: every path is tested wherever it can run."""
    params = []
    for name in names:
        for dtype in dtypes:
            # `gguf` (quantized blocks) runs where bfloat16 matrices do: on `cpu`, our kernels.
            as_torch = torch.bfloat16 if dtype == "gguf" else getattr(torch, dtype)
            reason = backend.unavailable(name, as_torch, device)
            marks = pytest.mark.skip(reason=f"{name}: {reason}") if reason else ()
            params.append(pytest.param((name, dtype), id=f"{name}-{dtype}", marks=marks))
    return params
