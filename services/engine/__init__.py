"""The selfspec engine: usable on its own, with no Ray, Redis or network.

Names load on first use, so that `services.engine.params` (what a gateway needs to
validate requests) imports without PyTorch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

_EXPORTS = {
    "Completion": "services.engine.engine",
    "Engine": "services.engine.engine",
    "ModelLoadError": "services.engine.checkpoint",
    "DraftConfig": "services.engine.params",
    "SamplingParams": "services.engine.params",
}
__all__ = ["Completion", "DraftConfig", "Engine", "ModelLoadError", "SamplingParams"]

if TYPE_CHECKING:
    from services.engine.checkpoint import ModelLoadError
    from services.engine.engine import Completion, Engine
    from services.engine.params import DraftConfig, SamplingParams


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'services.engine' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
