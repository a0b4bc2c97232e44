"""The engine's own forward pass on the Triton backend equals it on the PyTorch one: a
ragged prefill, then a verify step, through a tiny random Llama with grouped-query
attention (on the CPU in Triton's interpreter)."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig

from selfspec_kernels import backend, paged_attention
from selfspec_kernels.attention import AttentionBatch
from services.engine.kv_pool import BlockTable, KVPool
from services.engine.model import Model

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # the CPU runs the interpreter


def _model(backend_name: str) -> Model:
    config = LlamaConfig(
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=97,
        max_position_embeddings=64,
    )
    g = torch.Generator().manual_seed(0)
    tensors = {"model.embed_tokens.weight": torch.randn(97, 64, generator=g)}
    tensors["lm_head.weight"] = torch.randn(97, 64, generator=g) * 0.1
    tensors["model.norm.weight"] = 1 + 0.1 * torch.rand(64, generator=g)
    for i in range(2):
        p = f"model.layers.{i}."
        for name, shape in [
            ("self_attn.q_proj", (64, 64)),
            ("self_attn.k_proj", (32, 64)),
            ("self_attn.v_proj", (32, 64)),
            ("self_attn.o_proj", (64, 64)),
            ("mlp.gate_proj", (96, 64)),
            ("mlp.up_proj", (96, 64)),
            ("mlp.down_proj", (64, 96)),
        ]:
            tensors[p + name + ".weight"] = torch.randn(shape, generator=g) * 0.15
        tensors[p + "input_layernorm.weight"] = 1 + 0.1 * torch.rand(64, generator=g)
        tensors[p + "post_attention_layernorm.weight"] = 1 + 0.1 * torch.rand(64, generator=g)
    return Model(config, tensors, backend.choose(torch.float32, DEVICE, backend_name))


def _run(model: Model) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
    """Prefill 11 and 6 tokens, then verify 3 and 1: logits of both passes, and the pool."""
    pool = KVPool(num_layers=2, kv_dim=model.kv_dim, num_blocks=12, block_size=4,
                  dtype=torch.float32, device=DEVICE)  # fmt: skip
    tables = [BlockTable(pool) for _ in range(2)]
    for table in tables:
        table.reserve(16)
    blocks = [t.blocks for t in tables]
    ids = torch.tensor([5, 17, 3, 88, 41, 9, 60, 2, 33, 71, 14, 8, 25, 96, 50, 12, 7])
    logits = []
    for starts, lens, tokens in [([0, 0], [11, 6], ids), ([11, 6], [3, 1], ids[:4] + 1)]:
        batch = AttentionBatch.build(blocks, starts, lens, 4, device=DEVICE, reference=True)
        h = model.run_layers(model.embed_tokens(tokens.to(DEVICE)), batch, pool.kv)
        logits.append(model.logits(h))
    return logits[0], logits[1], pool.kv


def test_forward_on_kernels_equals_reference(monkeypatch: pytest.MonkeyPatch) -> None:
    want = _run(_model("torch"))
    calls = []
    kernel = paged_attention.paged_attention
    monkeypatch.setattr(
        paged_attention, "paged_attention", lambda *a, **k: calls.append(1) or kernel(*a, **k)
    )
    got = _run(_model("triton"))  # a model finds its attention when made
    assert len(calls) == 4  # two passes of two layers
    for a, b in zip(got[:2], want[:2], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    for a, b in zip(got[2], want[2], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
