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

from kernels.attention import AttentionBatch
from services.engine.kv_pool import KVPool
from services.engine.model import FULL, LayerPlan, Linear, Model
from services.engine.params import DraftConfig
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

    def _batch(self, seqs: list[Sequence], starts: list[int], lengths: list[int]):
        return AttentionBatch.build(
            [s.table.blocks for s in seqs],
            starts,
            lengths,
            self.pool.block_size,
            sliding_window=self.model.sliding_window,
            device=self.model.device,
        )

    def _tensor(self, ids: list[int]) -> torch.Tensor:
        return torch.tensor(ids, dtype=torch.long, device=self.model.device)

    @torch.inference_mode()
    def prefill(self, seq: Sequence, chunk: int, all_logits: bool = False) -> torch.Tensor | None:
        """Write the KV of the prompt's next `chunk` uncached tokens. When that completes the
        prompt, returns the logits after its last token (after every token of the chunk
        with `all_logits`); otherwise None."""
        n = len(seq.prompt)
        a = seq.table.num_tokens
        b = min(n, a + chunk)
        seq.table.reserve(b)
        batch = self._batch([seq], [a], [b - a])
        h = self.model.embed_tokens(self._tensor(seq.prompt[a:b]))
        h = self.model.run_layers(h, batch, self.pool.kv, bulk=b - a > BULK_TOKENS)
        seq.table.commit(b)
        if b < n:
            return None
        return self.model.logits(h if all_logits else h[-1:])

    @torch.inference_mode()
    def draft(self, seqs: list[Sequence], cfg: DraftConfig, max_lens: list[int]) -> Drafts:
        """Up to `max_lens[i]` tokens for each sequence, from the draft `cfg` describes."""
        return self.draft_mixed(seqs, cfg, [(cfg.mode, m) for m in max_lens])

    @torch.inference_mode()
    def draft_mixed(self, seqs: list[Sequence], cfg: DraftConfig, plans: list[tuple[str, int]]):
        """Draft each sequence in its own mode (`off`, `ngram`, or the layer draft of `cfg`),
        at most the given number of tokens; one verification then serves them all."""
        tokens: list[list[int]] = [[] for _ in seqs]
        for i, (mode, k) in enumerate(plans):
            if mode == "ngram" and k > 0:
                tokens[i] = ngram_proposal(seqs[i].tokens, k, cfg.ngram_min, cfg.ngram_max)
        layered = [i for i, (mode, k) in enumerate(plans) if mode in ("skip", "early_exit") and k]
        if not layered:
            return Drafts(tokens)
        t0 = time.perf_counter()
        part = self._layer_draft([seqs[i] for i in layered], cfg, [plans[i][1] for i in layered])
        passes = max(map(len, part.tokens), default=0)
        elapsed = time.perf_counter() - t0
        self.timing.draft_s += elapsed
        self.timing.draft_passes += passes
        if passes:
            self.costs.observe_draft(cfg.layer_mode, len(layered), elapsed / passes)
        hidden: list[torch.Tensor | None] = [None] * len(seqs)
        probs: list[torch.Tensor | None] = [None] * len(seqs)
        for j, i in enumerate(layered):
            tokens[i], hidden[i], probs[i] = part.tokens[j], part.hidden[j], part.probs[j]
        return Drafts(tokens, hidden, part.start_layer, probs)

    def _layer_draft(self, seqs, cfg: DraftConfig, max_lens: list[int]) -> Drafts:
        model = self.model
        plan, first, end = draft_plan(cfg, model.num_layers)
        head = self._draft_head(seqs, cfg.shortlist)
        tokens: list[list[int]] = [[] for _ in seqs]
        hidden: list[list[torch.Tensor]] = [[] for _ in seqs]
        probs: list[list[torch.Tensor]] = [[] for _ in seqs]
        active = [i for i, m in enumerate(max_lens) if m > 0]
        while active:
            still = []
            h, batch = self._newest_below(seqs, tokens, active, first)
            for j, i in enumerate(active):
                hidden[i].append(h[j])
            h = model.run_layers(h, batch, self.pool.kv, first, end, plan)
            for j, (tok, conf, q) in enumerate(self._pick(head(h), [seqs[i] for i in active])):
                i = active[j]
                if conf < cfg.threshold:
                    continue  # not confident: its token was processed, nothing more to do
                tokens[i].append(tok)
                if q is not None:
                    probs[i].append(q)
                if len(tokens[i]) < max_lens[i]:
                    still.append(i)
            active = still
        # The newest drafted token of each sequence still needs the layers below `first`.
        todo = [i for i in range(len(seqs)) if len(hidden[i]) == len(tokens[i])]
        if todo:
            h, _ = self._newest_below(seqs, tokens, todo, first)
            for j, i in enumerate(todo):
                hidden[i].append(h[j])
        q = [torch.stack(p) if p else None for p in probs]
        return Drafts(tokens, [torch.stack(x) for x in hidden], first, q)

    def _newest_below(self, seqs, tokens, which: list[int], first: int):
        """Run the newest token of sequences `which` (the last drafted one, else the last
        accepted one) through the layers below `first`; returns the hidden states and the
        attention batch of that pass."""
        group = [seqs[i] for i in which]
        starts = [seqs[i].table.num_tokens + len(tokens[i]) for i in which]
        batch = self._batch(group, starts, [1] * len(which))
        newest = [tokens[i][-1] if tokens[i] else seqs[i].last for i in which]
        h = self.model.embed_tokens(self._tensor(newest))
        return self.model.run_layers(h, batch, self.pool.kv, 0, first), batch

    def _draft_head(self, seqs: list[Sequence], shortlist: int):
        """A function from hidden states to (logits, the token id of each logit column)
        under the draft's head: the full vocabulary (ids None), or ids below `shortlist`
        plus those already in the context."""
        model = self.model
        if shortlist <= 0 or shortlist >= model.vocab_size:
            return lambda h: (model.logits(h), None)
        if self._low_head is None or self._low_head[0] != shortlist:
            self._low_head = (shortlist, Linear(model.head_weight[:shortlist].contiguous()))
        low = self._low_head[1]
        extra = self._tensor(sorted({t for s in seqs for t in s.tokens if t >= shortlist}))
        extra_w = model.head_weight[extra]
        ids = torch.cat((torch.arange(shortlist, device=model.device), extra))

        def short(h):
            x = model.final_norm(h)
            return torch.cat((low(x), F.linear(x, extra_w.to(x.dtype))), -1).float(), ids

        return short

    def _pick(self, head_out, seqs: list[Sequence]):
        """Per sequence: (drafted token, draft confidence, full-vocabulary distribution it was
        sampled from, or None when greedy)."""
        logits, ids = head_out
        greedy = torch.softmax(logits, -1).max(-1)
        picks = []
        for j, seq in enumerate(seqs):
            if seq.params.greedy:
                tok = int(greedy.indices[j])
                picks.append((tok if ids is None else int(ids[tok]), float(greedy.values[j]), None))
                continue
            q = probabilities(logits[j], seq.params)
            col = sample(q, seq.generator)
            if ids is not None:
                q = torch.zeros(self.model.vocab_size, device=q.device).index_copy_(0, ids, q)
                col = int(ids[col])
            picks.append((col, float(q.max()), q))
        return picks

    @torch.inference_mode()
    def verify(self, seqs: list[Sequence], drafts: Drafts) -> list[torch.Tensor]:
        """Logits `[k + 1, vocab]` after the last token and each drafted token, per sequence."""
        t0 = time.perf_counter()
        lengths = [len(t) + 1 for t in drafts.tokens]
        batch = self._batch(seqs, [s.table.num_tokens for s in seqs], lengths)
        hidden = drafts.hidden or [None] * len(seqs)
        missing = [i for i, h in enumerate(hidden) if h is None]
        if missing:  # sequences whose draft kept no hidden states start at the bottom
            group = [seqs[i] for i in missing]
            ids = [t for i in missing for t in [seqs[i].last, *drafts.tokens[i]]]
            sub = self._batch(
                group, [s.table.num_tokens for s in group], [lengths[i] for i in missing]
            )
            h = self.model.run_layers(
                self.model.embed_tokens(self._tensor(ids)), sub, self.pool.kv, 0, drafts.start_layer
            )
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
