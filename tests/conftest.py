"""Shared fixtures: the real default model, and tiny random models of each architecture."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest
import torch

from services.engine import Engine


@pytest.fixture(scope="session")
def engine() -> Engine:
    """The default model (SmolLM2-135M-Instruct) in float32, shared by the session."""
    return Engine.from_pretrained("default", dtype="float32")


@pytest.fixture(scope="session")
def bf16_engine() -> Engine:
    """The default model in bfloat16, as served."""
    return Engine.from_pretrained("default", dtype="bfloat16")


TINY = {
    "llama": ("LlamaConfig", {}),
    "llama3_rope": (
        "LlamaConfig",
        {
            "rope_parameters": {
                "rope_type": "llama3",
                "rope_theta": 10000.0,
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 64,
            }
        },
    ),
    "qwen2": ("Qwen2Config", {}),
    "qwen3": ("Qwen3Config", {"head_dim": 16}),
    "mistral": ("MistralConfig", {"sliding_window": 40}),
}


def make_tiny(kind: str, path, engine: Engine | None = None):
    """Save a randomly initialised model of architecture `kind` to `path`."""
    import transformers

    cls_name, extra = TINY[kind]
    config = getattr(transformers, cls_name)(
        vocab_size=512,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=kind in ("llama", "qwen3"),
        initializer_range=0.2,  # peaked logits: random models otherwise sit near ties
        **extra,
    )
    torch.manual_seed(len(kind))
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.save_pretrained(path)
    if engine is not None:
        engine.tokenizer.save_pretrained(path)
    return model


@pytest.fixture(scope="session", params=list(TINY))
def tiny(request, tmp_path_factory, engine):
    """(kind, HF model, our engine) for one tiny architecture."""
    path = tmp_path_factory.mktemp(request.param)
    hf = make_tiny(request.param, path, engine)
    ours = Engine.from_pretrained(str(path), dtype="float32", kv_cache_bytes=64 << 20)
    return request.param, hf, ours
