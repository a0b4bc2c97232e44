"""When drafting pays: the one speedup model, and the words it is decided in.

Drafting k tokens and verifying them in one pass yields, on average,
1 + a1 + a1*a2 + ... + a1*...*ak tokens (a_i: the chance that the draft's i-th token is
accepted, given those before it were), for the cost of k draft passes plus a
verification of k + 1 tokens. Both are counted against one plain decode step, so the
ratio is the expected speedup over plain decoding (1). A single acceptance rate alpha
(teacher-forced agreement) is the case of constant rates.

The engine's `auto` policy, the skip-set tuner and the fleet controller all rank drafts
with this model; decisions are made per batch-size bucket (`BUCKETS`), where costs
are measured, and the layer drafts (`LAYER_MODES`) are those that run the model itself.
Torch-free: the controller and the gateway import it.
"""

from __future__ import annotations

BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
LAYER_MODES = ("skip", "early_exit")


def bucket(batch: int) -> int:
    """The smallest bucket that holds `batch` sequences (the largest past them all)."""
    return next((b for b in BUCKETS if batch <= b), BUCKETS[-1])


def speedups(
    rates: list[float], draft_cost: float | list[float], token_cost: float | list[float]
) -> list[float]:
    """Expected speedup of drafting k tokens, for k = 1..len(rates). `rates`: acceptance
    at each draft position. `draft_cost`: of one draft pass, or of the pass at each
    position. `token_cost`: of each verified draft token, or what verifying k of them
    adds to a plain step, for each k (a pass dearer than its tokens, as measured).
    Costs are relative to one plain decode step; a list shorter than `rates` ends the
    curve."""
    n = len(rates)
    costs = draft_cost if isinstance(draft_cost, list) else [draft_cost] * n
    extra = (
        token_cost if isinstance(token_cost, list) else [k * token_cost for k in range(1, n + 1)]
    )
    curve, tokens, survive, drafting = [], 1.0, 1.0, 0.0
    for a, d, e in zip(rates, costs, extra, strict=False):
        survive *= a  # the chance that this token and all before it are accepted
        tokens += survive
        drafting += d
        curve.append(tokens / (1.0 + drafting + e))
    return curve


def best_length(
    rates: list[float],
    draft_cost: float | list[float],
    token_cost: float | list[float],
    min_k: int = 1,
    plain: bool = True,
) -> tuple[float, int]:
    """(expected speedup, k) of the best draft length k >= min_k, or (1.0, 0) where plain
    decoding beats them all. With `plain=False` the best draft is returned even under 1,
    so that a search can still rank drafts none of which pays yet. Ties go to the longer."""
    best = (1.0, 0) if plain else (0.0, min_k)
    curve = speedups(rates, draft_cost, token_cost)
    return max([best, *((s, k) for k, s in enumerate(curve, start=1) if k >= min_k)])


def speedup_at(
    rates: list[float], draft_cost: float | list[float], token_cost: float | list[float], k: int
) -> float:
    """Expected speedup of drafting exactly k tokens (0: plain decoding, 1); a k beyond
    the rates known counts as their number."""
    curve = speedups(rates[:k], draft_cost, token_cost)
    return curve[-1] if curve else 1.0
