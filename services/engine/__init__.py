"""The selfspec engine: usable on its own, with no Ray, Redis or network.

`Engine` (engine.py) loads a model and runs the loop: each step the scheduler plans
(scheduler.py: admission, prefill chunks, decode groups, preemption, sessions, over
the paged KV pool of kv_pool.py), the model runner computes (runner.py, model.py),
drafts are verified and accepted (sampler.py, policy.py), and each request's owner
hears what changed (outputs.py: completions and streamed deltas; detokenizer.py: text
and stop strings). Around it: prompts.py turns prompts into token ids, checkpoint.py
loads models, profile.py reads a model's tuned drafting, serving.py runs the loop on a
thread of its own for servers, params.py holds the request settings.

Names load on first use, so that `services.engine.params` (what a gateway needs to
validate requests) imports without PyTorch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

_EXPORTS = {
    "Completion": "services.engine.outputs",
    "Delta": "services.engine.outputs",
    "Engine": "services.engine.engine",
    "ModelLoadError": "services.engine.checkpoint",
    "DraftConfig": "services.engine.params",
    "SamplingParams": "services.engine.params",
}
__all__ = ["Completion", "Delta", "DraftConfig", "Engine", "ModelLoadError", "SamplingParams"]

if TYPE_CHECKING:
    from services.engine.checkpoint import ModelLoadError
    from services.engine.engine import Engine
    from services.engine.outputs import Completion, Delta
    from services.engine.params import DraftConfig, SamplingParams


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'services.engine' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
