"""A trained exit for the early-exit draft (Kangaroo's adapter, LayerSkip's early-exit
loss): a small residual MLP that carries the hidden state after layer `layer` to one the
model's own final norm and LM head read as the full model's next token.

Untrained (its `up` zero) it is the identity, the plain early exit. It is data of one
model, trained on that model's passes (`exit_training`): saved with the model's content
key, and refused for any other model.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

FILE = "selfspec/exit.safetensors"  # under the (converted) checkpoint folder, out of its globs


@dataclass(frozen=True)
class ExitAdapter:
    layer: int  # the layers run before the exit
    model_key: str  # the content key of the model it was trained on
    gain: torch.Tensor  # [hidden]: the RMSNorm before the MLP
    down: torch.Tensor  # [width, hidden]
    up: torch.Tensor  # [hidden, width]
    facts: dict = field(default_factory=dict)  # how it was trained: seed, data, time, agreement

    def __call__(self, h: torch.Tensor) -> torch.Tensor:
        x = h.float()
        inner = F.silu(F.linear(F.rms_norm(x, x.shape[-1:], self.gain), self.down))
        return (x + F.linear(inner, self.up)).to(h.dtype)

    def save(self, path: Path) -> Path:
        from safetensors.torch import save_file

        meta = {"layer": str(self.layer), "model_key": self.model_key}
        meta["facts"] = json.dumps(self.facts)
        tensors = {"gain": self.gain, "down": self.down, "up": self.up}
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        save_file({k: v.contiguous().cpu() for k, v in tensors.items()}, str(tmp), meta)
        tmp.replace(path)  # atomic: a replica loading meanwhile never reads half a file
        return path

    @classmethod
    def load(cls, path: Path, model_key: str, device="cpu") -> ExitAdapter:
        """The adapter in `path`; ValueError if it was trained on another model."""
        from safetensors import safe_open

        try:
            with safe_open(str(path), "pt", device=str(device)) as f:
                meta = f.metadata() or {}
                tensors = {k: f.get_tensor(k).float() for k in ("gain", "down", "up")}
        except Exception as exc:  # safetensors raises its own error types
            raise ValueError(f"cannot read the exit adapter {path}: {exc}") from None
        if meta.get("model_key") != model_key:
            raise ValueError(
                f"the exit adapter {path} was trained on the model with content key "
                f"{meta.get('model_key')!r}, not this one ({model_key!r}): an adapter is data "
                "of its model. Train one for this model with `selfspec train-draft`, or "
                "delete the file"
            )
        facts = json.loads(meta.get("facts", "{}"))
        return cls(int(meta["layer"]), model_key, facts=facts, **tensors)


def initial(layer: int, model_key: str, hidden: int, width: int, seed: int) -> ExitAdapter:
    """An untrained adapter: the identity (its `up` zero), `down` drawn from `seed`."""
    g = torch.Generator().manual_seed(seed)
    down = torch.randn(width, hidden, generator=g) / hidden**0.5
    return ExitAdapter(layer, model_key, torch.ones(hidden), down, torch.zeros(hidden, width))
