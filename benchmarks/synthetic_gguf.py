"""GGUF files of Llama-architecture models of a given shape, with random weights, for
benchmarks that time a model and need not run a trained one.

The file is what llama.cpp's converter writes for a SmolLM2: the default model's
tokenizer and chat template (`tokenizer.*`, copied from its GGUF), `llama.*` keys for the
shape, RMSNorm gains of one, the layers' matrices in one block format (Q4_1, as the
default model's) and the tied embedding in Q8_0. So `transformers` converts it and
`Engine.from_pretrained(path, weights="gguf")` loads it as it loads the default model.
Weights are normal with a small deviation so activations stay finite; llama.cpp's q/k
row permutation is left out, which changes what the model computes, not its time.

    python -m benchmarks.synthetic_gguf smollm2-360m smollm2-1.7b   # into the cache
"""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from services.engine import checkpoint

WEIGHT_STD = 0.02  # as transformers initialises Llama's matrices


@dataclass(frozen=True)
class Shape:
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    vocab: int = 49152  # the default model's tokenizer; fewer: its first tokens

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads


# SmolLM2's published configs (tied embeddings, head_dim 64).
SHAPES = {
    "smollm2-360m": Shape(hidden=960, layers=32, heads=15, kv_heads=5, intermediate=2560),
    "smollm2-1.7b": Shape(hidden=2048, layers=24, heads=32, kv_heads=32, intermediate=8192),
}


def cache_folder() -> Path:
    """Where built files are kept: `synthetic/` in selfspec's cache (`SELFSPEC_CACHE_DIR`)."""
    return checkpoint.cache_dir() / "synthetic"


def path_for(name: str, folder: Path | None = None) -> Path:
    return (folder or cache_folder()) / f"{name}-random.Q4_1.gguf"


def build(name: str, shape: Shape, folder: Path | None = None, seed: int = 0) -> Path:
    """The GGUF file of `shape` named `name`, written once (kept and reused after)."""
    import gguf

    path = path_for(name, folder)
    if path.is_file():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
    writer = gguf.GGUFWriter(tmp, arch="llama")
    _metadata(writer, name, shape)
    rng = np.random.default_rng(seed)
    Q = gguf.GGMLQuantizationType
    _add(writer, "token_embd.weight", _matrix(rng, shape.vocab, shape.hidden), Q.Q8_0)
    for i in range(shape.layers):
        for part, (rows, cols) in _layer_matrices(shape).items():
            _add(writer, f"blk.{i}.{part}.weight", _matrix(rng, rows, cols), Q.Q4_1)
        for part in ("attn_norm", "ffn_norm"):
            writer.add_tensor(f"blk.{i}.{part}.weight", np.ones(shape.hidden, np.float32))
        print(f"{name}: layer {i + 1}/{shape.layers} quantized", file=sys.stderr, flush=True)
    writer.add_tensor("output_norm.weight", np.ones(shape.hidden, np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    tmp.rename(path)  # atomic: a half-written file is never taken for a whole one
    print(f"{name}: wrote {path} ({path.stat().st_size / 1e6:.0f} MB)", file=sys.stderr)
    return path


def _layer_matrices(s: Shape) -> dict[str, tuple[int, int]]:
    """A layer's matrices, GGUF names to (rows, columns) as numpy holds them."""
    kv = s.kv_heads * s.head_dim
    return {
        "attn_q": (s.hidden, s.hidden),
        "attn_k": (kv, s.hidden),
        "attn_v": (kv, s.hidden),
        "attn_output": (s.hidden, s.hidden),
        "ffn_gate": (s.intermediate, s.hidden),
        "ffn_up": (s.intermediate, s.hidden),
        "ffn_down": (s.hidden, s.intermediate),
    }


def _matrix(rng: np.random.Generator, rows: int, cols: int) -> np.ndarray:
    return rng.standard_normal((rows, cols), dtype=np.float32) * WEIGHT_STD


def _add(writer, name: str, values: np.ndarray, qtype) -> None:
    from gguf.quants import quantize

    writer.add_tensor(name, quantize(values, qtype), raw_dtype=qtype)


def _metadata(writer, name: str, s: Shape) -> None:
    """The shape's `llama.*` keys; the rest (tokenizer, chat template, RoPE base, norm
    epsilon, context) as the default model's GGUF has them."""
    from gguf import GGUFReader, GGUFValueType

    source = GGUFReader(checkpoint.default_model_file())

    def copy(key: str) -> None:
        field = source.fields[key]
        sub = field.types[-1] if field.types[0] == GGUFValueType.ARRAY else None
        writer.add_key_value(key, field.contents(), field.types[0], sub)

    writer.add_name(name)
    writer.add_file_type(3)  # llama.cpp's MOSTLY_Q4_1, as the default model says
    writer.add_block_count(s.layers)
    writer.add_embedding_length(s.hidden)
    writer.add_feed_forward_length(s.intermediate)
    writer.add_head_count(s.heads)
    writer.add_head_count_kv(s.kv_heads)
    writer.add_rope_dimension_count(s.head_dim)
    writer.add_vocab_size(s.vocab)
    for key in ("context_length", "rope.freq_base", "attention.layer_norm_rms_epsilon"):
        copy(f"llama.{key}")
    vocabulary = _vocabulary(source, s.vocab)
    for key in source.fields:
        if key in vocabulary:
            writer.add_array(key, vocabulary[key])
        elif key.startswith("tokenizer.") or key == "general.quantization_version":
            copy(key)


def _vocabulary(source, n: int) -> dict[str, list]:
    """The first `n` tokens of the source's vocabulary, and the merges among them: a small
    vocabulary makes a small model quick to convert (its special tokens and bytes come
    first, so any text still tokenizes)."""
    tokens = source.fields["tokenizer.ggml.tokens"].contents()[:n]
    kept = set(tokens)
    merges = [
        m
        for m in source.fields["tokenizer.ggml.merges"].contents()
        if {*m.split(" "), m.replace(" ", "")} <= kept
    ]
    types = source.fields["tokenizer.ggml.token_type"].contents()[:n]
    return {
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.token_type": types,
        "tokenizer.ggml.merges": merges,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("names", nargs="+", choices=sorted(SHAPES))
    args = p.parse_args(argv)
    for name in args.names:
        print(build(name, SHAPES[name]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
