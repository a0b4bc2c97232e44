"""Prompt lookup (n-gram drafting): propose what followed the latest earlier match of
the context's longest suffix. Nearly free, so it is looked up when a step is planned:
the policy weighs the proposal's length before choosing."""

from __future__ import annotations

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view


def ngram_proposal(context: list[int], max_len: int, n_min: int, n_max: int) -> list[int]:
    """Prompt lookup: the continuation of the latest earlier match of the longest suffix."""
    ctx = np.asarray(context)
    L = len(ctx)
    for n in range(min(n_max, L - 1), n_min - 1, -1):
        windows = sliding_window_view(ctx[: L - 1], n)  # every n-gram that has a successor
        hits = np.flatnonzero((windows == ctx[L - n :]).all(axis=1))
        if len(hits):
            start = int(hits[-1]) + n
            return context[start : start + max_len]
    return []
