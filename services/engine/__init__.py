"""The selfspec engine: usable on its own, with no Ray, Redis or network.

Names load on first use, so that importing the package does not load PyTorch.
`DraftConfig` and `SamplingParams` live in `services.common.params`, shared with the
gateway and the controller; they are re-exported here as part of the engine's API.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

_EXPORTS = {
    "Completion": "services.engine.engine",
    "Engine": "services.engine.engine",
    "ModelLoadError": "services.engine.checkpoint",
    "DraftConfig": "services.common.params",
    "SamplingParams": "services.common.params",
}
__all__ = ["Completion", "DraftConfig", "Engine", "ModelLoadError", "SamplingParams"]

if TYPE_CHECKING:
    from services.common.params import DraftConfig, SamplingParams
    from services.engine.checkpoint import ModelLoadError
    from services.engine.engine import Completion, Engine


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'services.engine' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
