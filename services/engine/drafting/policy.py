"""The `auto` drafting policy: per sequence and step, the draft expected to pay most.

Expected gain of drafting k tokens in a mode: the tokens a verification yields,
1 + a1 + a1*a2 + ... (a_i: the sequence's running acceptance at draft position
i in that mode), divided by the step's cost, k draft passes plus a
verification of k + 1 tokens, in units of one plain decode step at the current
batch size. An n-gram proposal shorter than the room left may be continued by the
layer draft (`ngram+skip`): n-gram acceptance and no draft cost for its tokens, the
layer draft's for the rest. Costs are measured as the engine runs. Where nothing
beats 1 (plain decoding), as at large batches where verification stops being nearly
free, the sequence drafts nothing.

`AutoPolicy` holds everything the choice learns from: each sequence's acceptance, the
measured costs, and the telemetry of what was drafted and kept.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from services.common.speedup import LAYER_MODES, best_length
from services.engine.drafting.costs import Costs
from services.engine.drafting.ngram import ngram_proposal
from services.engine.drafting.plan import OFF, DraftPlan, Kind
from services.engine.drafting.telemetry import Telemetry

if TYPE_CHECKING:
    from services.common.params import DraftConfig
    from services.engine.drafting.proposer import Drafts
    from services.engine.sequence import Sequence

# Optimistic for the skip draft (0.8) and a draft model (0.7), so that they are tried
# and measured; still probabilities.
PRIOR_ACCEPT = {
    "ngram": (1.0, 2.0),
    "skip": (1.6, 2.0),
    "early_exit": (1.0, 2.0),
    "model": (1.4, 2.0),
}
DECAY = 0.9  # older acceptance counts fade, so a sequence's changing text is followed
POOLED_WEIGHT = 2.0  # told tokens the engine's pooled acceptance counts for in a new sequence
POOLED_DECAY = 0.98  # slower: it follows the engine's traffic, not one sequence's text
DRAFT_COST_PRIOR = 0.6  # a layer draft pass's cost, relative to a plain step, unmeasured


@dataclass
class Acceptance:
    """Running (accepted, told) counts per draft position, with a prior: a position is
    told when every token before it was accepted, so `rate(i)` is the chance that token i
    is accepted given those before it were, as the speedup model multiplies them. (All
    drafts counted, an n-gram's all-or-nothing copies would look ever worse further out.)"""

    prior: tuple[float, float]
    counts: list[list[float]] = field(default_factory=list)
    # The engine's acceptance over every sequence, which stands in for `prior` where given:
    # a new sequence starts from what drafts in this mode have been doing.
    pooled: Acceptance | None = None
    decay: float = DECAY

    def rate(self, i: int) -> float:
        a, n = self.prior
        if self.pooled is not None:
            a, n = POOLED_WEIGHT * self.pooled.rate(i), POOLED_WEIGHT
        if i < len(self.counts):
            a, n = a + self.counts[i][0], n + self.counts[i][1]
        return a / n

    def update(self, drafted: int, accepted: int, start: int = 0) -> None:
        """`drafted` tokens at positions from `start`, of which the first `accepted` were:
        those and the first rejected one are told, the rest not."""
        told = min(drafted, accepted + 1)
        while len(self.counts) < start + told:
            self.counts.append([0.0, 0.0])
        for i in range(told):
            c = self.counts[start + i]
            c[0] = c[0] * self.decay + (1.0 if i < accepted else 0.0)
            c[1] = c[1] * self.decay + 1.0


class AutoPolicy:
    """The `auto` choice, and what it learns from every verified draft, in any mode."""

    def __init__(self) -> None:
        self.costs = Costs()
        self.telemetry = Telemetry()
        # Whether `auto` may use the layer draft: off where tuning measured it slower
        # than none, until the fleet asks for it.
        self.layer_draft = True
        # The prior cost of a draft model's pass, relative to a plain step; None: the
        # engine has no draft model (`drafting.draft_model.relative_reads`).
        self.model_cost: float | None = None
        # Per sequence, its running acceptance by mode; gone with the sequence.
        self._acceptance: weakref.WeakKeyDictionary[Sequence, dict[str, Acceptance]] = (
            weakref.WeakKeyDictionary()
        )
        self._pooled: dict[str, Acceptance] = {}  # per mode, over every sequence

    def acceptance(self, seq: Sequence, mode: str) -> Acceptance:
        """`seq`'s running acceptance per draft position in `mode`."""
        modes = self._acceptance.setdefault(seq, {})
        if mode not in modes:
            prior = PRIOR_ACCEPT.get(mode, (1.0, 2.0))
            pooled = self._pooled.setdefault(mode, Acceptance(prior, decay=POOLED_DECAY))
            modes[mode] = Acceptance(prior, pooled=pooled)
        return modes[mode]

    def _update(self, seq: Sequence, mode: str, drafted: int, accepted: int, start: int = 0):
        """A verified draft told to the sequence's acceptance and the engine's pooled one."""
        acc = self.acceptance(seq, mode)
        acc.update(drafted, accepted, start)
        acc.pooled.update(drafted, accepted, start)

    def choose(self, seq: Sequence, cfg: DraftConfig, room: int, batch: int) -> DraftPlan:
        """The plan with the best expected speedup, with the sequence's n-gram proposal
        (looked up once, here)."""
        if room == 0:
            return OFF
        proposal = tuple(ngram_proposal(seq.tokens, room, cfg.ngram_min, cfg.ngram_max))
        ngram = self.acceptance(seq, "ngram")
        ngram_rates = [ngram.rate(i) for i in range(len(proposal))]
        token_cost = self.costs.extra_costs(batch, room)
        options = [(1.0, 0, OFF)]
        if proposal:
            gain, k = best_length(ngram_rates, 0.0, token_cost)
            options.append((gain, k, DraftPlan(Kind.NGRAM, k, proposal=proposal)))
        layer = cfg.layer_mode if self.layer_draft else None
        if layer is not None:
            draft_cost, _ = self.costs.relative(layer, batch, DRAFT_COST_PRIOR)
            acc = self.acceptance(seq, layer)
            rates = [acc.rate(i) for i in range(room)]
            gain, k = best_length(rates, draft_cost, token_cost)
            options.append((gain, k, DraftPlan(Kind.LAYER, k, layer)))
            lead = len(proposal)
            if 0 < lead < room:  # the proposal runs out: the layer draft may continue it
                per_pass = [0.0] * lead + [draft_cost] * (room - lead)
                gain, k = best_length(ngram_rates + rates[lead:], per_pass, token_cost, lead + 1)
                options.append((gain, k, DraftPlan(Kind.NGRAM_LAYER, k, layer, proposal)))
        if self.model_cost is not None:
            draft_cost, _ = self.costs.relative("model", batch, self.model_cost)
            acc = self.acceptance(seq, "model")
            gain, k = best_length([acc.rate(i) for i in range(room)], draft_cost, token_cost)
            options.append((gain, k, DraftPlan(Kind.MODEL, k)))
        _, k, plan = max(options, key=lambda o: o[0])  # the first best, as ever
        return plan if k else OFF

    def observe_draft(self, cfg: DraftConfig, drafts: Drafts) -> None:
        """Each drafter's measured cost per pass, at the batch size it drafted for."""
        for name, (batch, passes, seconds, steady) in drafts.timed.items():
            if passes and steady:
                mode = cfg.layer_mode if name == "layer" else name
                self.costs.observe_draft(mode, batch, seconds / passes)

    def learn(
        self, seq: Sequence, plan: DraftPlan, drafts: Drafts, i: int, accepted: int, nxt: int
    ) -> None:
        """What a verified draft teaches: the sequence's running acceptance per position in
        each mode it drafted with, and (greedy layer drafts) acceptance by confidence."""
        proposed = drafts.tokens[i]
        lead = drafts.prefix[i] if drafts.prefix else 0  # n-gram tokens before the layer's
        mode = plan.layer or plan.kind.value  # `ngram` or `model`
        if lead:
            self._update(seq, "ngram", lead, min(accepted, lead))
            if accepted < lead:
                return  # verification rejected the n-gram part: the rest is untold
        self._update(seq, mode, len(proposed) - lead, accepted - lead, start=lead)
        if seq.params.greedy and drafts.confidence is not None and mode in LAYER_MODES:
            self.telemetry.record_confidence(
                mode, drafts.confidence[i], accepted - lead, drafts.dropped[i], nxt
            )
