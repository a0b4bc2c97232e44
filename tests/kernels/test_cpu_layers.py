"""All layers of a pass in one C++ call give the bits of the Python loop over the kernels."""

from __future__ import annotations

import pytest
import torch

from selfspec_kernels import cpu_layers
from selfspec_kernels.attention import AttentionBatch
from services.engine import Engine
from services.engine.model import LayerPlan

pytestmark = pytest.mark.skipif(
    not cpu_layers.CPU.available(),
    reason=f"CPU kernels unavailable: {cpu_layers.CPU.unavailable_reason()}",
)


@pytest.fixture(scope="module", params=["bf16", "gguf"])
def cpu_model(request):
    """The default model on the `cpu` backend, whichever this machine would pick, with
    dense bfloat16 weights and with the GGUF's own blocks."""
    engine = Engine.from_pretrained(
        "default", backend="cpu", weights=request.param, kv_cache_bytes=8 << 20
    )
    return engine.model


def _pass(model, plan: LayerPlan, start: int, end, python: bool):
    """Two sequences (1 and 4 new tokens after 37 and 200 cached ones) through layers
    [start, end) of `model`, on a pool of random keys and values; the hidden states out
    and the pool after."""
    gen = torch.Generator().manual_seed(0)
    block_size, blocks = 16, 32
    pool = [
        torch.randn(blocks * block_size, 2 * model.kv_dim, generator=gen).to(model.kv_dtype)
        for _ in range(model.num_layers)
    ]
    tables = [list(range(0, 6)), list(range(31, 10, -1))]
    batch = AttentionBatch.build(
        tables, [37, 200], [1, 4], block_size, sliding_window=model.sliding_window, reference=False
    )
    h = torch.randn(5, model.config.hidden_size, generator=gen)
    stack = model.stack
    model.stack = None if python else stack
    try:
        out = model.run_layers(h, batch, pool, start, end, plan)
    finally:
        model.stack = stack
    return out, pool


@pytest.mark.parametrize(
    "plan, start, end",
    [
        (LayerPlan(), 0, None),
        (LayerPlan(frozenset({3, 9}), frozenset({4, 20})), 0, None),
        (LayerPlan(frozenset({12}), frozenset()), 5, 17),
    ],
    ids=["full", "skip", "range"],
)
def test_matches_the_python_loop(cpu_model, plan: LayerPlan, start: int, end) -> None:
    model = cpu_model
    assert model.stack is not None, "the default model on the cpu backend runs the C++ loop"
    got, got_pool = _pass(model, plan, start, end, python=False)
    want, want_pool = _pass(model, plan, start, end, python=True)
    assert torch.equal(got, want)
    for layer, (a, b) in enumerate(zip(got_pool, want_pool, strict=True)):
        assert torch.equal(a, b), f"layer {layer}'s keys and values differ"


@pytest.mark.parametrize("kind", ["qwen2", "mistral"])
def test_biases_and_windows_match_the_python_loop(kind: str, tiny_checkpoint) -> None:
    """Qwen2's q, k and v biases; Mistral's sliding window (40 positions)."""
    path = tiny_checkpoint(kind)
    model = Engine.from_pretrained(
        str(path), dtype="bfloat16", backend="cpu", kv_cache_bytes=8 << 20
    ).model
    assert model.stack is not None
    for layer in model.layers:  # random models start with zero biases
        if layer.qkv.bias is not None:
            layer.qkv.bias.normal_(generator=torch.Generator().manual_seed(1))
    plan = LayerPlan(frozenset({1}), frozenset())
    got, got_pool = _pass(model, plan, 0, None, python=False)
    want, want_pool = _pass(model, plan, 0, None, python=True)
    assert torch.equal(got, want)
    assert all(torch.equal(a, b) for a, b in zip(got_pool, want_pool, strict=True))


@pytest.mark.parametrize("name", ["onednn", "torch"])
def test_other_backends_keep_the_python_loop(name: str, tiny_checkpoint) -> None:
    """Their products are not our kernels', which the C++ loop calls."""
    path = tiny_checkpoint("llama")
    model = Engine.from_pretrained(str(path), backend=name, kv_cache_bytes=8 << 20).model
    assert model.stack is None


def test_bad_plan_is_refused(cpu_model) -> None:
    model = cpu_model
    batch = AttentionBatch.build([[0]], [0], [1], 16, reference=False)
    pool = [torch.zeros(16, 2 * model.kv_dim, dtype=model.kv_dtype)] * model.num_layers
    h = torch.zeros(1, model.config.hidden_size)
    rope = torch.view_as_real(model.rope[batch.positions])
    last = model.num_layers - 1
    with pytest.raises(RuntimeError, match="layers 29..32 of 30"):
        cpu_layers.run(model.stack, h, batch, pool, rope, last, [True] * 3, [False] * 3)
    with pytest.raises(RuntimeError, match="3 attention flags but 2 MLP flags"):
        cpu_layers.run(model.stack, h, batch, pool, rope, 0, [True] * 3, [False] * 2)
