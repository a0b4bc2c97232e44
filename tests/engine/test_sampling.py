"""Speculative sampling leaves the model's output distribution exactly as it is."""

from __future__ import annotations

import pytest
import torch
from scipy.stats import chisquare

from services.engine import SamplingParams, sampler
from services.engine.sampler import accept_sampled, probabilities

VOCAB = 12
DRAWS = 12000
SETTINGS = [
    SamplingParams(temperature=1.0),
    SamplingParams(temperature=0.7, top_k=5),
    SamplingParams(temperature=1.3, top_p=0.8),
    SamplingParams(temperature=0.9, top_k=8, top_p=0.9),
    SamplingParams(temperature=1.0, min_p=0.1),
    SamplingParams(temperature=1.2, top_p=0.95, min_p=0.05),
]


def first_token_frequencies(
    params, closeness: float, seed: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Draw the first emitted token many times; return its counts and the target's p."""
    g = torch.Generator().manual_seed(seed)
    target_logits = torch.randn(3, VOCAB, generator=g) * 2
    draft_logits = (
        closeness * target_logits + (1 - closeness) * torch.randn(3, VOCAB, generator=g) * 2
    )
    p = probabilities(target_logits, params)
    q = probabilities(draft_logits, params)
    counts = torch.zeros(VOCAB)
    for _ in range(DRAWS):
        proposed = [int(torch.multinomial(q[i], 1, generator=g)) for i in range(2)]
        n, nxt = accept_sampled(proposed, q[:2], p, g)
        counts[proposed[0] if n > 0 else nxt] += 1
    return counts, p[0]


def chi_square_p(counts: torch.Tensor, p: torch.Tensor) -> float:
    keep = p > 0
    assert counts[~keep].sum() == 0, "a token outside top-k/top-p was emitted"
    expected = p[keep].double() / p[keep].double().sum() * counts.sum().double()
    return chisquare(counts[keep].double().numpy(), expected.numpy()).pvalue


@pytest.mark.parametrize("params", SETTINGS)
@pytest.mark.parametrize("closeness", [0.9, 0.0])
def test_first_token_follows_the_target(params, closeness):
    counts, p = first_token_frequencies(params, closeness, seed=1)
    assert chi_square_p(counts, p) > 1e-3


def test_ngram_point_mass_drafts_keep_the_distribution():
    g = torch.Generator().manual_seed(5)
    params = SamplingParams(temperature=0.8)
    p = probabilities(torch.randn(2, VOCAB, generator=g) * 2, params)
    counts = torch.zeros(VOCAB)
    for _ in range(DRAWS):
        n, nxt = accept_sampled([3], None, p, g)
        counts[3 if n else nxt] += 1
    assert chi_square_p(counts, p[0]) > 1e-3


def test_the_test_catches_a_broken_residual(monkeypatch):
    """Sampling from p instead of the residual after a rejection skews the output."""
    monkeypatch.setattr(sampler, "residual", lambda p, q: p)
    counts, p = first_token_frequencies(SETTINGS[0], 0.0, seed=1)
    assert chi_square_p(counts, p) < 1e-6


def test_top_k_and_top_p_processing():
    logits = torch.tensor([[4.0, 3.0, 2.0, 1.0, 0.0]])
    p = probabilities(logits, SamplingParams(temperature=1.0, top_k=2))
    assert (p[0, 2:] == 0).all() and torch.isclose(p.sum(), torch.tensor(1.0))
    full = torch.softmax(logits, -1)[0]
    p = probabilities(logits, SamplingParams(temperature=1.0, top_p=float(full[0]) + 1e-3))
    assert (p[0] > 0).tolist() == [True, True, False, False, False]


def test_min_p_drops_tokens_under_min_p_times_the_top_one():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.1, 0.06, 0.04]]))
    mask = sampler.min_p_mask(logits, 0.15)  # 0.15 * 0.5 = 0.075
    assert mask.tolist() == [[False, False, False, True, True]]
    p = probabilities(logits, SamplingParams(temperature=1.0, min_p=0.15))
    torch.testing.assert_close(p[0, :3], torch.tensor([0.5, 0.3, 0.1]) / 0.9)
    assert (p[0, 3:] == 0).all()
    assert probabilities(logits, SamplingParams(temperature=1.0, min_p=1.0))[0].tolist() == [
        1.0,
        0.0,
        0.0,
        0.0,
        0.0,
    ]


def test_same_seed_same_output(engine):
    params = SamplingParams(max_tokens=16, temperature=0.9, top_p=0.95, seed=11)
    for mode in ["off", "skip", "ngram"]:
        a = engine.generate(["Tell me a story."], params, mode, chat=True)[0].token_ids
        b = engine.generate(["Tell me a story."], params, mode, chat=True)[0].token_ids
        assert a == b, mode
    assert engine.pool.num_free == engine.pool.num_blocks
