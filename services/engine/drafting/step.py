"""The speculative step: plan a draft per sequence, draft, verify every draft in one
pass, keep what the full model agrees with, and learn from it.

Greedy sequences keep the drafted tokens up to the first the full model would not have
chosen, then the full model's own; sampling ones go by rejection sampling, with the
same temperature, min-p, top-k and top-p on both sides. Either way the output is the full
model's, whatever was drafted.
"""

from __future__ import annotations

import logging
import time

import torch

from services.common.params import DraftConfig
from services.engine import faults, logprobs
from services.engine.drafting.plan import OFF, DraftPlan, Kind, fixed
from services.engine.drafting.policy import AutoPolicy
from services.engine.drafting.proposer import Drafts
from services.engine.runner import ModelRunner
from services.engine.sampler import accept_greedy, accept_sampled, probabilities, sample
from services.engine.sequence import Sequence

log = logging.getLogger(__name__)


class Speculator:
    """Runs steps for an engine: its runner's passes, its `auto` policy's choices."""

    def __init__(self, runner: ModelRunner, max_positions: int) -> None:
        self.runner = runner
        self.max_positions = max_positions
        self.policy = AutoPolicy()

    def room(self, seq: Sequence, cfg: DraftConfig) -> int:
        """How many tokens a step may draft for `seq`."""
        return seq.draft_room(cfg.max_draft, self.max_positions)

    def plan(self, seq: Sequence, cfg: DraftConfig, room: int, batch: int) -> DraftPlan:
        if cfg.mode == "auto":
            return self.policy.choose(seq, cfg, room, batch)
        return fixed(cfg, seq.tokens, room)

    def _with_room(self, seq: Sequence, plan: DraftPlan) -> DraftPlan:
        """`plan`, or none where the draft model's pool has no room for it."""
        if plan.kind is not Kind.MODEL:
            return plan
        if self.runner.draft_model is None:
            raise ValueError("this engine has no draft model: start it with --draft-model")
        return plan if self.runner.draft_model.reserve(seq, plan.k) else OFF

    def step(
        self, seqs: list[Sequence], cfg: DraftConfig, eos_ids: frozenset[int]
    ) -> list[tuple[Sequence, Exception]]:
        """Draft for every sequence, verify all drafts in one pass, accept what agrees.
        Raises when a batched pass fails, before any sequence changed; a failure while
        accepting for one sequence is returned with it, and the others go on."""
        rooms = [self.room(s, cfg) for s in seqs]
        for s, r in zip(seqs, rooms, strict=True):
            s.table.reserve(s.num_tokens + r)
        plans = [self.plan(s, cfg, r, len(seqs)) for s, r in zip(seqs, rooms, strict=True)]
        plans = [self._with_room(s, p) for s, p in zip(seqs, plans, strict=True)]
        drafts = self.runner.draft_mixed(seqs, cfg, plans)
        self.policy.observe_draft(cfg, drafts)
        t0 = time.perf_counter()
        logits = self.runner.verify(seqs, drafts)
        verified = sum(len(t) + 1 for t in drafts.tokens)
        self.policy.costs.observe_verify(len(seqs), verified, time.perf_counter() - t0)
        failed = []
        for i, seq in enumerate(seqs):
            try:
                self._accept(seq, plans[i], drafts, i, logits[i], len(seqs), eos_ids)
            except Exception as exc:
                log.exception("request %s failed", seq.id)
                failed.append((seq, exc))
        return failed

    def _accept(
        self,
        seq: Sequence,
        plan: DraftPlan,
        drafts: Drafts,
        i: int,
        logits: torch.Tensor,
        batch: int,
        eos_ids: frozenset[int],
    ) -> None:
        faults.check("sample", [seq.id])
        proposed = drafts.tokens[i]
        if seq.params.greedy:
            n, nxt = accept_greedy(proposed, logits)
        else:
            q = drafts.probs[i] if drafts.probs is not None else None
            n, nxt = accept_sampled(proposed, q, probabilities(logits, seq.params), seq.generator)
        seq.stats.record(len(proposed), n)
        self.policy.telemetry.record(plan.name, batch, len(proposed), n)
        if proposed:
            self.policy.learn(seq, plan, drafts, i, n, nxt)
        added = seq.append(proposed[:n] + [nxt], eos_ids)
        # Row j of the verification gave the token at j: the kept drafted ones, then nxt.
        logprobs.record(seq, logits, added)
        # KV is kept for the tokens kept, all but the newest: a stop inside the draft
        # leaves the drafted tokens after it uncommitted.
        seq.table.commit(seq.num_tokens - 1)


def first_token(seq: Sequence, logits: torch.Tensor) -> int:
    """A sequence's first output token, from the logits after its prompt."""
    if seq.params.greedy:
        return int(logits.argmax())
    return sample(probabilities(logits, seq.params), seq.generator)
