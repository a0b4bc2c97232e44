"""A GGUF file's tensors as it stores them, under the Hugging Face names `Model` loads.

Matrices in a block format that our CPU kernels multiply (`selfspec_kernels.cpu_quant`)
stay in it, as `Quantized`: the engine then computes the GGUF's own model, reading a
fraction of the bytes. Everything else (norm gains, biases, float matrices, block
formats the kernels lack) is dequantized to float32, exactly. llama.cpp stores a Llama's
q and k rows permuted for its RoPE; they are put back in the checkpoint's order, as
`transformers` does when it loads a GGUF, so that `Model` treats both sources alike.
"""

from __future__ import annotations

import logging
import re
from collections import Counter
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from selfspec_kernels.cpu_quant import Quantized, format_of, quantized

__all__ = ["read"]

log = logging.getLogger(__name__)

# GGUF names (after `blk.N.`) and their Hugging Face names (after `model.layers.N.`).
LAYER_NAMES = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
GLOBAL_NAMES = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
}
_LAYER = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)")
_GLOBAL = re.compile(r"(\w+)\.(weight|bias)")


def read(path: Path, config) -> dict[str, torch.Tensor | Quantized]:
    """The tensors of GGUF file `path` by Hugging Face name; `config` is the model's
    (its head counts undo llama.cpp's q and k permutation)."""
    from gguf import GGUFReader

    reader = GGUFReader(path)
    arch = reader.fields["general.architecture"].contents()
    tensors: dict[str, torch.Tensor | Quantized] = {}
    kept: Counter[str] = Counter()
    for t in reader.tensors:
        name = hf_name(t.name)
        if name is None:
            log.debug("%s: not a tensor of the model's layers; skipped", t.name)
            continue
        value = _tensor(t)
        kept[value.format.name if isinstance(value, Quantized) else "float32"] += 1
        if arch == "llama" and (".q_proj." in name or ".k_proj." in name):
            heads = config.num_attention_heads if ".q_proj." in name else config.num_key_value_heads
            value = _rows(value, lambda w, h=heads: unpermute(w, h))
        tensors[name] = value
    log.info("GGUF tensors kept as stored: %s", dict(kept))
    return tensors


def hf_name(gguf_name: str) -> str | None:
    """The Hugging Face name of a GGUF tensor, or None for one `Model` does not load."""
    if m := _LAYER.fullmatch(gguf_name):
        layer, part, kind = m.groups()
        return f"model.layers.{layer}.{LAYER_NAMES[part]}.{kind}" if part in LAYER_NAMES else None
    if m := _GLOBAL.fullmatch(gguf_name):
        part, kind = m.groups()
        return f"{GLOBAL_NAMES[part]}.{kind}" if part in GLOBAL_NAMES else None
    return None


def unpermute(w: torch.Tensor, heads: int) -> torch.Tensor:
    """Undo llama.cpp's permutation of a head's rows (pairs back to halves)."""
    d = w.shape[0] // heads
    return w.view(heads, d // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape).contiguous()


def _rows(value, reorder):
    """`reorder` applied to the rows of a matrix, quantized or not (a block lies in a row)."""
    if isinstance(value, Quantized):
        return replace(value, data=reorder(value.data))
    return reorder(value)


def _tensor(t) -> torch.Tensor | Quantized:
    """One GGUF tensor: a matrix in a format the kernels take as it is, else float32."""
    from gguf.quants import dequantize

    k = int(t.shape[0])  # GGUF lists dims innermost first
    fmt = format_of(int(t.tensor_type))
    if fmt is not None and len(t.shape) == 2:
        return quantized(torch.from_numpy(np.array(t.data)), fmt, k)
    values = dequantize(np.asarray(t.data), t.tensor_type).astype(np.float32)
    return torch.from_numpy(values.reshape(*reversed([int(n) for n in t.shape])))
