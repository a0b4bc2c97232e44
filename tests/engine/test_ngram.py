"""Prompt lookup proposes what followed the latest earlier match of the longest suffix."""

from __future__ import annotations

import random

from services.engine.runner import ngram_proposal


def slow_reference(context: list[int], max_len: int, n_min: int, n_max: int) -> list[int]:
    for n in range(min(n_max, len(context) - 1), n_min - 1, -1):
        suffix = context[len(context) - n :]
        for start in range(len(context) - n - 1, -1, -1):
            if context[start : start + n] == suffix:
                return context[start + n : start + n + max_len]
    return []


def test_examples():
    assert ngram_proposal([1, 2, 3, 4, 1, 2], 3, 1, 4) == [3, 4, 1]
    assert ngram_proposal([9, 1, 2, 3, 9, 1, 2, 3, 9], 2, 1, 4) == [1, 2]
    assert ngram_proposal([5, 6, 7], 2, 1, 4) == []
    assert ngram_proposal([7], 2, 1, 4) == []


def test_matches_a_plain_search_on_random_contexts():
    rng = random.Random(0)
    for _ in range(500):
        context = [rng.randrange(6) for _ in range(rng.randint(1, 60))]
        args = (rng.randint(1, 5), rng.randint(1, 2), rng.randint(2, 5))
        assert ngram_proposal(context, *args) == slow_reference(context, *args)
