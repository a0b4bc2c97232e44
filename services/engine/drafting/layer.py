"""The layer draft: the model itself with sublayers skipped (`skip`) or cut short after
its first layers (`early_exit`, through the model's trained exit where it has one at that
layer: `exit_adapter`), one pass per drafted position.

For each drafted token the draft keeps the hidden state at the first layer its plan
changes. Everything below that layer is exactly what the full model computes, so
verification starts there instead of at the bottom, and the KV entries the draft wrote
for those layers stay.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from services.common.params import DraftConfig
from services.engine.drafting.proposer import Drafts
from services.engine.exit_adapter import ExitAdapter
from services.engine.model import FULL, LayerPlan, Linear
from services.engine.sampler import probabilities, sample
from services.engine.sequence import Sequence

if TYPE_CHECKING:
    from services.engine.runner import ModelRunner


def draft_plan(cfg: DraftConfig, num_layers: int) -> tuple[LayerPlan, int, int]:
    """The layer plan of a draft, the first layer it changes, and the layer it ends at."""
    if cfg.layer_mode == "early_exit":
        return FULL, cfg.exit_layer, cfg.exit_layer
    plan = LayerPlan(frozenset(cfg.skip_attn), frozenset(cfg.skip_mlp))
    return plan, plan.first_skipped, num_layers


class LayerDrafter:
    """A `Proposer` whose passes the runner runs (`ModelRunner.run_rows`)."""

    def __init__(self, runner: ModelRunner) -> None:
        self.runner = runner
        self.model = runner.model
        self._low_head: tuple[int, Linear] | None = None  # the shortlist's head, cached
        self.exit: ExitAdapter | None = None  # a trained exit (`exit_adapter`), if any

    def propose(
        self, seqs: list[Sequence], cfg: DraftConfig, lengths: list[int], leads: list[list[int]]
    ) -> Drafts:
        """The layer draft of `cfg`, continuing each sequence's `leads` (n-gram tokens, run
        through the draft's layers together in its first pass) up to `lengths`."""
        plan, first, end = draft_plan(cfg, self.model.num_layers)
        head = self._draft_head(seqs, cfg.shortlist)
        adapter = self.exit  # drafted through where this is an early exit at its layer
        at_exit = adapter and cfg.layer_mode == "early_exit" and adapter.layer == end
        trained = adapter if at_exit else None
        tokens = [list(p) for p in leads]
        done = [0] * len(seqs)  # this step's rows ([last] + tokens) below `first` so far
        hidden: list[list[torch.Tensor]] = [[] for _ in seqs]
        probs = [self._point_masses(s, p) for s, p in zip(seqs, leads, strict=True)]
        confidence: list[list[float]] = [[] for _ in seqs]
        dropped: list[tuple[int, float] | None] = [None] * len(seqs)
        active = [i for i, m in enumerate(lengths) if m > len(tokens[i])]
        passes = 0
        while active:
            passes += 1
            still = []
            h, ends = self._rows(seqs, tokens, done, active, first, hidden, (end, plan))
            top = h[ends] if trained is None else trained(h[ends])
            for j, (tok, conf, q) in enumerate(self._pick(head(top), [seqs[i] for i in active])):
                i = active[j]
                if conf < cfg.threshold:
                    dropped[i] = (tok, conf)  # processed, not proposed: drafting stops
                    continue
                tokens[i].append(tok)
                confidence[i].append(conf)
                if q is not None:
                    probs[i].append(q)
                if len(tokens[i]) < lengths[i]:
                    still.append(i)
            active = still
        # The newest drafted tokens still need the layers below `first`.
        todo = [i for i in range(len(seqs)) if done[i] < len(tokens[i]) + 1]
        if todo:
            self._rows(seqs, tokens, done, todo, first, hidden)
        q = [torch.stack(p) if p else None for p in probs]
        return Drafts(
            tokens, [torch.cat(x) for x in hidden], first, q, confidence, dropped, passes=passes
        )

    def _rows(self, seqs, tokens, done, which: list[int], first: int, hidden, then=None):
        """Run the rows of sequences `which` not yet run (the last accepted token, then the
        drafted ones) through the layers below `first`, keeping their hidden states in
        `hidden`, and with `then` = (end, plan) on through the draft's layers. Returns the
        draft's hidden states (None without `then`) and the row of each sequence's newest
        token."""
        rows = [([seqs[i].last] + tokens[i])[done[i] :] for i in which]
        starts = [seqs[i].table.num_tokens + done[i] for i in which]
        lengths = [len(r) for r in rows]
        below, top = self.runner.run_rows([seqs[i] for i in which], starts, rows, first, then)
        for i, part in zip(which, below.split(lengths), strict=True):
            hidden[i].append(part)
            done[i] += len(part)
        ends = torch.tensor(lengths, device=below.device).cumsum(0) - 1
        return top, ends

    def _tensor(self, ids) -> torch.Tensor:
        return torch.tensor(ids, dtype=torch.long, device=self.model.device)

    def _point_masses(self, seq: Sequence, prefix: list[int]) -> list[torch.Tensor]:
        """A sampling sequence's n-gram tokens were proposed with certainty: as draft
        distributions, point masses; greedy sequences keep none."""
        if seq.params.greedy or not prefix:
            return []
        masses = F.one_hot(self._tensor(prefix), self.model.vocab_size).float()
        return list(masses.unbind(0))

    def _draft_head(self, seqs: list[Sequence], shortlist: int):
        """A function from hidden states to (logits, the token id of each logit column)
        under the draft's head: the full vocabulary (ids None), or ids below `shortlist`
        plus those already in the context."""
        model = self.model
        if shortlist <= 0 or shortlist >= model.vocab_size:
            return lambda h: (model.logits(h), None)
        if self._low_head is None or self._low_head[0] != shortlist:
            self._low_head = (
                shortlist,
                model.head_part(torch.arange(shortlist, device=model.device)),
            )
        low = self._low_head[1]
        extra = self._tensor(sorted({t for s in seqs for t in s.tokens if t >= shortlist}))
        extra_w = model.head_rows(extra)
        ids = torch.cat((torch.arange(shortlist, device=model.device), extra))

        def short(h):
            x = model.final_norm(h)
            return torch.cat((low(x), F.linear(x, extra_w.to(x.dtype))), -1).float(), ids

        return short

    def _pick(self, head_out, seqs: list[Sequence]):
        """Per sequence: (drafted token, draft confidence, full-vocabulary distribution it was
        sampled from, or None when greedy)."""
        logits, ids = head_out
        if ids is not None:
            logits = logits.masked_fill(~self._own_columns(seqs, ids), float("-inf"))
        greedy = torch.softmax(logits, -1).max(-1)
        picks = []
        for j, seq in enumerate(seqs):
            if seq.params.greedy:
                tok = int(greedy.indices[j])
                picks.append((tok if ids is None else int(ids[tok]), float(greedy.values[j]), None))
                continue
            q = probabilities(logits[j], seq.params)
            if ids is not None:  # sampled over the whole vocabulary, as without a shortlist
                q = torch.zeros(self.model.vocab_size, device=q.device).index_copy_(0, ids, q)
            picks.append((sample(q, seq.generator), float(q.max()), q))
        return picks

    def _own_columns(self, seqs: list[Sequence], ids: torch.Tensor) -> torch.Tensor:
        """`[len(seqs), len(ids)]`: which shortlist columns each sequence may draft, the
        shortlist and its own context. The head carries every context of the batch, but a
        draft that depended on other sequences would sample differently in other company."""
        low = ids < self._low_head[0]
        return torch.stack([low | torch.isin(ids, self._tensor(s.tokens)) for s in seqs])
