"""A model's tuned drafting profile: where it lives, and the default drafting it gives.

`selfspec tune` (tune.py) measures drafting on a model and writes the profile; profiles
shipped for known models are in `profiles/`.
"""

from __future__ import annotations

import json
from pathlib import Path

from services.common.params import DraftConfig, untuned_skip_attn
from services.engine import checkpoint

PROFILES = Path(__file__).parent / "profiles"


def profile_path(model_path: Path) -> Path:
    """Where the tuned drafting profile of a model lives: shipped ones first."""
    if model_path.parent == checkpoint.cache_dir():  # a converted GGUF: <stem>-<hash>
        shipped = PROFILES / f"{model_path.name.rsplit('-', 1)[0]}.json"
        if shipped.is_file():
            return shipped
    return model_path / "selfspec_profile.json"


def load_profile(model_path: Path, num_layers: int) -> tuple[DraftConfig, bool]:
    """The model's default drafting (mode `auto`), and whether `auto` may use its layer
    draft: not where tuning measured the layer draft slower than none."""
    path = profile_path(model_path)
    if not path.is_file():
        return DraftConfig(skip_attn=untuned_skip_attn(num_layers), mode="auto"), True
    profile = json.loads(path.read_text())
    fields, evidence = profile["draft"], profile.get("evidence", {})
    measured = evidence.get("measured_tokens_per_s", 1.0)
    layer_pays = measured > evidence.get("off_tokens_per_s", 0.0)
    return DraftConfig(**{**fields, "mode": "auto"}), layer_pays
