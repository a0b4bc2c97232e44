"""Model passes over a batch of sequences: prefill, draft, verify.

Drafting with a layer plan keeps, for each drafted token, the hidden state at
the first layer the plan changes. Everything below that layer is exactly what
the full model computes, so verification starts there instead of at the bottom,
and the KV entries the draft wrote for those layers stay.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from numpy.lib.stride_tricks import sliding_window_view

from services.common.params import DraftConfig
from services.common.speedup import LAYER_MODES
from services.engine import faults
from services.engine.kv_pool import KVPool
from services.engine.model import FULL, LayerPlan, Linear, Model
from services.engine.policy import Costs
from services.engine.sampler import probabilities, sample
from services.engine.sequence import Sequence

BULK_TOKENS = 64  # prefill chunks longer than this take the many-row products


@dataclass
class Timing:
    """Wall time spent in model passes, for benchmarks and the drafting policy."""

    draft_s: float = 0.0
    draft_passes: int = 0  # one per drafted position, all sequences together
    verify_s: float = 0.0
    verify_passes: int = 0

    def reset(self) -> None:
        self.__init__()


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
    # Per sequence, how many of its tokens lead from an n-gram proposal (`ngram+` modes).
    prefix: list[int] | None = None
    passes: int = 0  # layer-draft passes run


def draft_plan(cfg: DraftConfig, num_layers: int) -> tuple[LayerPlan, int, int]:
    """The layer plan of a draft, the first layer it changes, and the layer it ends at."""
    if cfg.layer_mode == "early_exit":
        return FULL, cfg.exit_layer, cfg.exit_layer
    plan = LayerPlan(frozenset(cfg.skip_attn), frozenset(cfg.skip_mlp))
    return plan, plan.first_skipped, num_layers


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


class ModelRunner:
    def __init__(self, model: Model, pool: KVPool) -> None:
        self.model = model
        self.pool = pool
        self._low_head: tuple[int, Linear] | None = None
        self.timing = Timing()
        self.costs = Costs()

    def _batch(self, seqs: list[Sequence], starts: list[int], lengths: list[int], bulk=False):
        blocks = [s.table.blocks for s in seqs]
        return self.model.attention_batch(blocks, starts, lengths, self.pool.block_size, bulk)

    def _tensor(self, ids: list[int]) -> torch.Tensor:
        return torch.tensor(ids, dtype=torch.long, device=self.model.device)

    @torch.inference_mode()
    def prefill(self, seq: Sequence, chunk: int, all_logits: bool = False) -> torch.Tensor | None:
        """Write the KV of the next `chunk` uncached tokens of `seq.prefill_target`. When
        that completes it, returns the logits after its last token (after every token of
        the chunk with `all_logits`); otherwise None."""
        faults.check("prefill", [seq.id])
        a, n = seq.table.num_tokens, seq.prefill_target
        # The prompt goes in the chunks of its first prefill; output recomputed after a
        # preemption in passes as few-row as those that first wrote it, which give the
        # same KV bit for bit (row-invariance).
        end = len(seq.prompt) if a < len(seq.prompt) else a + BULK_TOKENS
        b = min(n, a + chunk, end)
        seq.table.reserve(b)
        bulk = b - a > BULK_TOKENS
        batch = self._batch([seq], [a], [b - a], bulk)
        h = self.model.embed_tokens(self._tensor(seq.tokens[a:b]))
        h = self.model.run_layers(h, batch, self.pool.kv, bulk=bulk)
        seq.table.commit(b)
        if b < n:
            return None
        return self.model.logits(h if all_logits else h[-1:], all_logits)

    @torch.inference_mode()
    def draft(self, seqs: list[Sequence], cfg: DraftConfig, max_lens: list[int]) -> Drafts:
        """Up to `max_lens[i]` tokens for each sequence, from the draft `cfg` describes."""
        return self.draft_mixed(seqs, cfg, [(cfg.mode, m) for m in max_lens])

    @torch.inference_mode()
    def draft_mixed(
        self,
        seqs: list[Sequence],
        cfg: DraftConfig,
        plans: list[tuple[str, int]],
        proposals: list[list[int] | None] | None = None,
    ) -> Drafts:
        """Draft each sequence in its own mode, at most the given number of tokens; one
        verification then serves them all. Modes: `off`, `ngram`, the layer draft of `cfg`
        (`skip` or `early_exit`), or `ngram+` that layer draft: the n-gram proposal,
        continued by the layer draft up to the length. `proposals`: n-gram proposals the
        caller already looked up (None: look them up here)."""
        proposals = proposals or [None] * len(seqs)
        tokens: list[list[int]] = [[] for _ in seqs]
        for i, (mode, k) in enumerate(plans):
            if k > 0 and mode.startswith("ngram"):
                found = proposals[i]
                if found is None:
                    found = ngram_proposal(seqs[i].tokens, k, cfg.ngram_min, cfg.ngram_max)
                tokens[i] = found[: k - 1] if mode != "ngram" else found[:k]
        layer_plans = [k if m.removeprefix("ngram+") in LAYER_MODES else 0 for m, k in plans]
        layered = [i for i, k in enumerate(layer_plans) if k]
        if not layered:
            return Drafts(tokens)
        t0 = time.perf_counter()
        part = self._layer_draft(
            [seqs[i] for i in layered],
            cfg,
            [plans[i][1] for i in layered],
            [tokens[i] for i in layered],
        )
        elapsed = time.perf_counter() - t0
        self.timing.draft_s += elapsed
        self.timing.draft_passes += part.passes
        if part.passes:
            self.costs.observe_draft(cfg.layer_mode, len(layered), elapsed / part.passes)
        hidden: list[torch.Tensor | None] = [None] * len(seqs)
        probs: list[torch.Tensor | None] = [None] * len(seqs)
        confidence: list[list[float]] = [[] for _ in seqs]
        dropped: list[tuple[int, float] | None] = [None] * len(seqs)
        prefix = [0] * len(seqs)
        for j, i in enumerate(layered):
            prefix[i] = len(tokens[i])
            tokens[i], hidden[i], probs[i] = part.tokens[j], part.hidden[j], part.probs[j]
            confidence[i], dropped[i] = part.confidence[j], part.dropped[j]
        return Drafts(tokens, hidden, part.start_layer, probs, confidence, dropped, prefix)

    def _layer_draft(
        self, seqs, cfg: DraftConfig, max_lens: list[int], prefixes: list[list[int]]
    ) -> Drafts:
        """The layer draft of `cfg`, continuing each sequence's `prefixes` (n-gram tokens,
        run through the draft's layers together in its first pass) up to `max_lens`."""
        model = self.model
        plan, first, end = draft_plan(cfg, model.num_layers)
        head = self._draft_head(seqs, cfg.shortlist)
        tokens = [list(p) for p in prefixes]
        done = [0] * len(seqs)  # this step's rows ([last] + tokens) below `first` so far
        hidden: list[list[torch.Tensor]] = [[] for _ in seqs]
        probs = [self._point_masses(s, p) for s, p in zip(seqs, prefixes, strict=True)]
        confidence: list[list[float]] = [[] for _ in seqs]
        dropped: list[tuple[int, float] | None] = [None] * len(seqs)
        active = [i for i, m in enumerate(max_lens) if m > len(tokens[i])]
        passes = 0
        while active:
            passes += 1
            still = []
            h, batch, ends = self._rows_below(seqs, tokens, done, active, first, hidden)
            h = model.run_layers(h, batch, self.pool.kv, first, end, plan)
            for j, (tok, conf, q) in enumerate(
                self._pick(head(h[ends]), [seqs[i] for i in active])
            ):
                i = active[j]
                if conf < cfg.threshold:
                    dropped[i] = (tok, conf)  # processed, not proposed: drafting stops
                    continue
                tokens[i].append(tok)
                confidence[i].append(conf)
                if q is not None:
                    probs[i].append(q)
                if len(tokens[i]) < max_lens[i]:
                    still.append(i)
            active = still
        # The newest drafted tokens still need the layers below `first`.
        todo = [i for i in range(len(seqs)) if done[i] < len(tokens[i]) + 1]
        if todo:
            self._rows_below(seqs, tokens, done, todo, first, hidden)
        q = [torch.stack(p) if p else None for p in probs]
        return Drafts(
            tokens, [torch.cat(x) for x in hidden], first, q, confidence, dropped, passes=passes
        )

    def _rows_below(self, seqs, tokens, done, which: list[int], first: int, hidden):
        """Run the rows of sequences `which` not yet run (the last accepted token, then the
        drafted ones) through the layers below `first`, keeping their hidden states in
        `hidden`. Returns the hidden states, the attention batch of the pass, and the row
        of each sequence's newest token."""
        group = [seqs[i] for i in which]
        rows = [([seqs[i].last] + tokens[i])[done[i] :] for i in which]
        starts = [seqs[i].table.num_tokens + done[i] for i in which]
        lengths = [len(r) for r in rows]
        batch = self._batch(group, starts, lengths)
        h = self.model.embed_tokens(self._tensor([t for r in rows for t in r]))
        h = self.model.run_layers(h, batch, self.pool.kv, 0, first)
        for i, part in zip(which, h.split(lengths), strict=True):
            hidden[i].append(part)
            done[i] += len(part)
        ends = torch.tensor(lengths, device=h.device).cumsum(0) - 1
        return h, batch, ends

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
                model.linear(model.head_rows(torch.arange(shortlist, device=model.device))),
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

    @torch.inference_mode()
    def verify(self, seqs: list[Sequence], drafts: Drafts) -> list[torch.Tensor]:
        """Logits `[k + 1, vocab]` after the last token and each drafted token, per sequence."""
        faults.check("verify", [s.id for s in seqs])
        t0 = time.perf_counter()
        lengths = [len(t) + 1 for t in drafts.tokens]
        batch = self._batch(seqs, [s.table.num_tokens for s in seqs], lengths)
        hidden = drafts.hidden or [None] * len(seqs)
        missing = [i for i, h in enumerate(hidden) if h is None]
        if missing:  # sequences whose draft kept no hidden states start at the bottom
            group = [seqs[i] for i in missing]
            ids = [t for i in missing for t in [seqs[i].last, *drafts.tokens[i]]]
            h = self.model.embed_tokens(self._tensor(ids))
            if drafts.start_layer > 0:
                sub = self._batch(
                    group, [s.table.num_tokens for s in group], [lengths[i] for i in missing]
                )
                h = self.model.run_layers(h, sub, self.pool.kv, 0, drafts.start_layer)
            hidden = list(hidden)
            for i, part in zip(missing, h.split([lengths[i] for i in missing]), strict=True):
                hidden[i] = part
        h = torch.cat(hidden)
        h = self.model.run_layers(h, batch, self.pool.kv, drafts.start_layer)
        logits = list(self.model.logits(h).split(lengths))
        elapsed = time.perf_counter() - t0
        self.timing.verify_s += elapsed
        self.timing.verify_passes += 1
        self.costs.observe_verify(len(seqs), sum(lengths), elapsed)
        return logits
