"""Sampling where the logits are: a sequence's generator lives on its KV pool's device
(PyTorch samples CUDA tensors only with a CUDA generator), and a seed gives the same
draws every time. On the CPU always, on CUDA where there is a GPU."""

from __future__ import annotations

import pytest
import torch

from services.common.params import SamplingParams
from services.engine.kv_pool import BlockTable, KVPool
from services.engine.sampler import accept_sampled, probabilities, sample
from services.engine.sequence import Sequence

DEVICES = [
    "cpu",
    pytest.param(
        "cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
    ),
]
SAMPLED = SamplingParams(temperature=0.9, top_k=50, seed=3)


def _sequence(device: str, params: SamplingParams = SAMPLED) -> Sequence:
    pool = KVPool(num_layers=1, kv_dim=8, num_blocks=4, block_size=4, dtype=torch.float32,
                  device=device)  # fmt: skip
    return Sequence("s", [1, 2, 3], params, BlockTable(pool))


def _draws(seq: Sequence, device: str) -> list[int]:
    """Tokens from `sample` and from speculative acceptance, as the engine calls them."""
    g = torch.Generator().manual_seed(0)
    logits = (torch.randn(3, 300, generator=g) * 3).to(device)
    p = probabilities(logits, seq.params)
    q = probabilities(logits.roll(1, -1), seq.params)
    out = [sample(p[0], seq.generator) for _ in range(10)]
    for _ in range(10):
        out += accept_sampled([int(p[0].argmax()), int(p[1].argmax())], q[:2], p, seq.generator)
    return out


@pytest.mark.parametrize("device", DEVICES)
def test_generator_on_the_pools_device(device: str) -> None:
    seq = _sequence(device)
    assert seq.generator is not None and seq.generator.device.type == device
    assert _sequence(device, SamplingParams()).generator is None  # greedy draws nothing


@pytest.mark.parametrize("device", DEVICES)
def test_seeded_draws_repeat(device: str) -> None:
    first = _draws(_sequence(device), device)
    assert _draws(_sequence(device), device) == first
    other = _sequence(device, SamplingParams(temperature=0.9, top_k=50, seed=4))
    assert _draws(other, device) != first


def test_unseeded_leaves_torchs_global_generator_alone() -> None:
    torch.manual_seed(0)
    want = torch.rand(3)
    torch.manual_seed(0)
    seq = _sequence("cpu", SamplingParams(temperature=1.0))
    assert torch.equal(torch.rand(3), want)
    assert seq.generator.initial_seed() != _sequence("cpu", seq.params).generator.initial_seed()


def test_a_generator_elsewhere_still_samples() -> None:
    """Probabilities on another device than the generator are moved to it, not refused
    (on a CPU-only machine: same device, the no-op path)."""
    probs = torch.tensor([0.0, 1.0, 0.0])
    assert sample(probs, torch.Generator().manual_seed(1)) == 1
    assert sample(probs, None) == 1
