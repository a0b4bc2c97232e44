"""The selfspec engine: usable on its own, with no Ray, Redis or network.

`Engine` (engine.py) loads a model and runs the loop; each step:
- scheduler.py plans it: cancellations, admission, the prefill chunk, the decode
  groups and the preemption that makes room for them, over kv_pool.py's blocks;
- the engine runs it: prefill on runner.py (model.py's forward, layers.py's parts),
  then the speculative step of the `drafting` package (plan, draft, verify, accept,
  learn; sampler.py) per group;
- outputs.py tells each request's owner what changed: completions, streamed deltas
  (text and stop strings: detokenizer.py).
Around the loop: prompts.py (prompts to token ids), checkpoint.py (loading a model;
gguf_weights.py reads a GGUF's matrices as stored, for `weights="gguf"`),
profile.py (a model's tuned drafting), first_layers.py (a draft model cut from a
model's first layers), serving.py (the loop on a thread of its own,
`submit`, the fleet's configs), sequence.py (one request's state), logprobs.py
(per-token logprobs, for requests that ask for them).

Names load on first use, so that importing the package does not load PyTorch.
`DraftConfig` and `SamplingParams` live in `services.common.params`, shared with the
gateway and the controller; they are re-exported here as part of the engine's API.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

_EXPORTS = {
    "Completion": "services.engine.outputs",
    "Delta": "services.engine.outputs",
    "Engine": "services.engine.engine",
    "ModelLoadError": "services.engine.checkpoint",
    "DraftConfig": "services.common.params",
    "SamplingParams": "services.common.params",
    "TokenLogprob": "services.engine.logprobs",
}
__all__ = [
    "Completion",
    "Delta",
    "DraftConfig",
    "Engine",
    "ModelLoadError",
    "SamplingParams",
    "TokenLogprob",
]

if TYPE_CHECKING:
    from services.common.params import DraftConfig, SamplingParams
    from services.engine.checkpoint import ModelLoadError
    from services.engine.engine import Engine
    from services.engine.logprobs import TokenLogprob
    from services.engine.outputs import Completion, Delta


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'services.engine' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
