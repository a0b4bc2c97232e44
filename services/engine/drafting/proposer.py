"""The drafter interface, and the drafts every drafter hands to verification.

A drafter that runs a model (the layer draft, the draft model) implements `Proposer`;
the runner's `draft_mixed` calls it for the sequences whose plan names it, after
putting the n-gram lookup's tokens (`DraftPlan.lead`) in front.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

import torch

if TYPE_CHECKING:
    from services.common.params import DraftConfig
    from services.engine.sequence import Sequence


@dataclass
class Drafts:
    """Proposed tokens per sequence, and where verification may start."""

    tokens: list[list[int]]
    # Per sequence `[k + 1, hidden]` at `start_layer`; None where the draft kept none.
    hidden: list[torch.Tensor | None] | None = None
    start_layer: int = 0
    # Per sampling sequence, the `[k, vocab]` distributions its tokens were drawn from;
    # None for greedy sequences and for n-gram proposals (certain, a point mass).
    probs: list[torch.Tensor | None] | None = None
    # Layer drafts only, per sequence: the draft's confidence in each token it kept, and
    # the (token, confidence) it stopped at for falling under the threshold, if it did.
    confidence: list[list[float]] | None = None
    dropped: list[tuple[int, float] | None] | None = None
    # Per sequence, how many of its tokens lead from an n-gram proposal (`ngram+` plans).
    prefix: list[int] | None = None
    passes: int = 0  # draft passes run, all sequences together
    # Whether the passes only drafted: a draft model's first step after a prompt also
    # reads the prompt, which is no draft pass's cost.
    steady: bool = True
    # Per drafter that ran ("layer", "model"): (sequences, passes, seconds, steady).
    timed: dict[str, tuple[int, int, float, bool]] = field(default_factory=dict)


class Proposer(Protocol):
    def propose(
        self, seqs: list[Sequence], cfg: DraftConfig, lengths: list[int], leads: list[list[int]]
    ) -> Drafts:
        """Up to `lengths[i]` tokens for `seqs[i]`, continuing `leads[i]` (tokens proposed
        ahead of this drafter, which the result's tokens start with). Distributions, where
        kept, cover the leads too; `passes` counts the drafter's passes."""
        ...
