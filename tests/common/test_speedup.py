"""The one speedup model (services/common/speedup.py), pinned against the three formulas
it replaced (issue 20): the engine policy's `best_length`, the tuner's geometric
`expected_speedup` and the controller's `forced_speedup` and `speedup_at`."""

from __future__ import annotations

import pytest

from services.common.params import MAX_DRAFT_TOKENS
from services.common.speedup import BUCKETS, best_length, bucket, speedup_at, speedups
from services.controller.decide import forced_speedup

ALPHAS = (0.0, 0.3, 0.7, 0.95, 1.0)


def geometric(alpha: float, k: int) -> float:
    """Tokens one verification yields when each of k drafts is accepted with `alpha`."""
    return k + 1 if alpha >= 1 else (1 - alpha ** (k + 1)) / (1 - alpha)


@pytest.mark.parametrize(
    "args, expected",
    [
        # (rates, draft cost, token cost, min_k), as the engine's policy returned them
        (([0.9, 0.8, 0.5], 0.1, 0.02, 1), (2.191176470588235, 3)),
        (([0.2, 0.1], 0.5, 0.05, 1), (1.0, 0)),  # nothing pays: plain decoding
        (([0.9, 0.9, 0.9, 0.9], 0.0, [0.01, 0.02, 0.2], 1), (2.8658333333333337, 3)),
        (([0.9, 0.9, 0.9], [0.0, 0.3, 0.3], 0.02, 2), (2.0716867469879516, 3)),
    ],
)
def test_best_length_is_the_policy_s(args, expected):
    assert best_length(*args) == expected


@pytest.mark.parametrize("alpha", ALPHAS)
@pytest.mark.parametrize("cost", (0.05, 0.3, 0.9))
def test_constant_rates_are_the_tuner_s_geometric_model(alpha, cost):
    verify = [1.0, 1.0, 1.03, 1.1, 1.25, 1.25, 1.6]  # timed passes of k + 1 tokens
    extra = [v - 1.0 for v in verify[1:]]
    speedup, k = best_length([alpha] * len(extra), cost, extra, plain=False)
    old = max((geometric(alpha, j) / (j * cost + verify[j]), j) for j in range(1, len(verify)))
    assert k == old[1]
    assert speedup == pytest.approx(old[0], rel=1e-12)


@pytest.mark.parametrize("alpha", ALPHAS)
@pytest.mark.parametrize("draft_cost, token_cost", [(0.7, 0.02), (0.1, 0.01), (0.02, 0.0)])
def test_forced_speedup_is_the_controller_s(alpha, draft_cost, token_cost):
    speedup, k = forced_speedup(alpha, draft_cost, token_cost)
    old = max(
        (geometric(alpha, j) / (1.0 + j * (draft_cost + token_cost)), j)
        for j in range(1, MAX_DRAFT_TOKENS + 1)
    )
    assert k == old[1]
    assert speedup == pytest.approx(old[0], rel=1e-12)


def test_speedup_at_one_length():
    rates = [0.9, 0.8]
    assert speedup_at(rates, 0.1, 0.02, 0) == 1.0
    assert speedup_at(rates, 0.1, 0.02, 1) == pytest.approx(1.9 / 1.12)
    assert speedup_at(rates, 0.1, 0.02, 5) == pytest.approx(2.62 / 1.24)  # only two known
    assert speedup_at(rates, 0.1, 0.02, 2) == speedups(rates, 0.1, 0.02)[-1]


def test_buckets():
    assert [bucket(n) for n in (1, 3, 8, 9, 256, 1000)] == [1, 4, 8, 16, 256, BUCKETS[-1]]
