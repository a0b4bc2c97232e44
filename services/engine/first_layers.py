"""A draft model cut from a model's own first layers (`selfspec draft-from-layers`).

The first N layers with the model's embeddings, final norm, LM head and tokenizer make a
checkpoint folder of their own: the same tokenizer and chat template as the model, so it
can draft for it (`--draft-model`, mode `model`) with no training, and its early layers
compute exactly what the model's do.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from safetensors.torch import save_file

from services.engine import checkpoint


def save_first_layers(source: Path, out: Path, layers: int, **config) -> Path:
    """`source`'s (a checkpoint folder's) first `layers` layers with its embeddings, final
    norm, LM head and tokenizer, as a checkpoint folder `out` of their own (`config`: more
    config changes). Raises ValueError for a layer count the source lacks, or an `out`
    that exists."""
    settings = json.loads((source / "config.json").read_text())
    total = settings["num_hidden_layers"]
    if not 1 <= layers <= total:
        raise ValueError(f"layers must be between 1 and {total} (the model's), got {layers}")
    if out.exists():
        raise ValueError(f"{out} exists; pass a new folder to write the draft model to")
    settings.update(num_hidden_layers=layers, **config)
    kept = {
        name: t
        for name, t in checkpoint.load_tensors(source).items()
        if not name.startswith("model.layers.") or int(name.split(".")[2]) < layers
    }
    out.mkdir(parents=True)
    save_file(kept, str(out / "model.safetensors"))
    (out / "config.json").write_text(json.dumps(settings))
    # The tokenizer, its chat template and the generation config: all but the weights.
    for f in source.iterdir():
        if f.is_file() and f.name != "config.json" and not _weights_file(f):
            shutil.copy(f, out / f.name)
    return out


def _weights_file(f: Path) -> bool:
    return f.suffix == ".safetensors" or f.name == "model.safetensors.index.json"
