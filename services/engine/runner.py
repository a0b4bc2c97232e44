"""The one place the model runs: prefill, the passes of drafts, verification, and
teacher-forced passes, each over a batch of sequences' KV blocks.

Verification may start above the bottom layer: a layer draft keeps the hidden states
at the first layer its plan changes (see `drafting.layer`), below which it computed
exactly what the full model does.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass

import torch

from services.common.params import DraftConfig
from services.engine import faults
from services.engine.drafting.draft_model import DraftModel
from services.engine.drafting.layer import LayerDrafter
from services.engine.drafting.plan import DraftPlan, Kind
from services.engine.drafting.proposer import Drafts, Proposer
from services.engine.kv_pool import BlockTable, KVPool, OutOfBlocks
from services.engine.model import FULL, LayerPlan, Model
from services.engine.sequence import Sequence

BULK_TOKENS = 64  # prefill chunks longer than this take the many-row products


@dataclass
class Timing:
    """Wall time spent in model passes, for benchmarks."""

    draft_s: float = 0.0
    draft_passes: int = 0  # one per drafted position, all sequences together
    verify_s: float = 0.0
    verify_passes: int = 0

    def reset(self) -> None:
        self.__init__()


class ModelRunner:
    def __init__(self, model: Model, pool: KVPool, draft_model: DraftModel | None = None) -> None:
        """`draft_model`: the engine's draft model, which model plans draft with."""
        self.model = model
        self.pool = pool
        self.timing = Timing()
        self.layer_drafter = LayerDrafter(self)
        self.draft_model = draft_model

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
    def draft_mixed(self, seqs: list[Sequence], cfg: DraftConfig, plans: list[DraftPlan]) -> Drafts:
        """Draft each sequence by its plan; one verification then serves them all. A plan's
        n-gram tokens lead; the layer draft of `cfg` continues those of layer plans, the
        draft model those of model plans."""
        tokens = [list(p.lead) for p in plans]
        parts = {
            "layer": [i for i, p in enumerate(plans) if p.layered],
            "model": [i for i, p in enumerate(plans) if p.kind is Kind.MODEL and p.k],
        }
        if not any(parts.values()):
            return Drafts(tokens)
        n = len(seqs)
        out = Drafts(tokens, [None] * n, 0, [None] * n, [[] for _ in seqs], [None] * n, [0] * n)
        for name, which in parts.items():
            if which:
                drafter = self.layer_drafter if name == "layer" else self.draft_model
                self._draft_part(seqs, cfg, plans, which, drafter, out, name)
        return out

    def _draft_part(
        self, seqs, cfg, plans, which: list[int], drafter: Proposer, out: Drafts, name: str
    ):
        """Sequences `which` drafted by `drafter` (`name`), into `out`."""
        t0 = time.perf_counter()
        part = drafter.propose(
            [seqs[i] for i in which],
            cfg,
            [plans[i].k for i in which],
            [out.tokens[i] for i in which],
        )
        elapsed = time.perf_counter() - t0
        self.timing.draft_s += elapsed
        self.timing.draft_passes += part.passes
        out.passes += part.passes
        out.timed[name] = (len(which), part.passes, elapsed, part.steady)
        out.start_layer = max(out.start_layer, part.start_layer)
        for j, i in enumerate(which):
            out.prefix[i] = len(out.tokens[i])
            out.tokens[i], out.probs[i] = part.tokens[j], part.probs[j]
            out.hidden[i] = part.hidden[j] if part.hidden is not None else None
            out.confidence[i], out.dropped[i] = part.confidence[j], part.dropped[j]

    def run_rows(
        self,
        seqs: list[Sequence],
        starts: list[int],
        rows: list[list[int]],
        stop: int,
        then: tuple[int, LayerPlan] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """A drafter's pass: each sequence's `rows` of tokens, written from `starts[i]` on,
        through the layers below `stop`, and with `then` = (end, plan) on through layers
        [stop, end) under `plan`. Returns the hidden states at `stop` and at `end`."""
        batch = self._batch(seqs, starts, [len(r) for r in rows])
        h = self.model.embed_tokens(self._tensor([t for r in rows for t in r]))
        below = self.model.run_layers(h, batch, self.pool.kv, 0, stop)
        if then is None:
            return below, None
        end, plan = then
        return below, self.model.run_layers(below, batch, self.pool.kv, stop, end, plan)

    @torch.inference_mode()
    def forced(
        self,
        tokens: list[list[int]],
        plan: LayerPlan = FULL,
        start: list[int] | None = None,
        bulk: bool = True,
    ) -> list[torch.Tensor] | None:
        """Teacher-forced: each token list in one pass under `plan`, in KV blocks borrowed
        from the pool and given back; per list, the logits after each of its tokens from
        `start[i]` on (default: all). None when the pool has too few free blocks. `bulk`:
        the many-row products, as for a long prefill (off: as a verification runs)."""
        start = start or [0] * len(tokens)
        lengths = [len(t) for t in tokens]
        try:
            with self._borrowed(tokens, bulk) as batch:
                h = self.model.embed_tokens(self._tensor([t for seq in tokens for t in seq]))
                h = self.model.run_layers(h, batch, self.pool.kv, plan=plan, bulk=bulk)
        except OutOfBlocks:
            return None
        offsets = [0, *torch.tensor(lengths).cumsum(0).tolist()]
        rows = [r for i, s in enumerate(start) for r in range(offsets[i] + s, offsets[i + 1])]
        logits = self.model.logits(h[self._tensor(rows)], bulk=bulk)
        return list(logits.split([n - s for n, s in zip(lengths, start, strict=True)]))

    @torch.inference_mode()
    def forced_states(
        self, tokens: list[list[int]], layer: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Teacher-forced over token lists in one pass: after each token, the hidden state
        after the first `layer` layers and the full model's logits (an exit's training
        data), the lists' rows one after another. Raises OutOfBlocks when the pool has
        too few free blocks."""
        with self._borrowed(tokens, bulk=True) as batch:
            h = self.model.embed_tokens(self._tensor([t for seq in tokens for t in seq]))
            below = self.model.run_layers(h, batch, self.pool.kv, 0, layer, bulk=True)
            h = self.model.run_layers(below, batch, self.pool.kv, layer, bulk=True)
        return below, self.model.logits(h, bulk=True)

    @contextlib.contextmanager
    def _borrowed(self, tokens: list[list[int]], bulk: bool):
        """The attention batch of token lists written from position 0 into KV blocks
        borrowed from the pool for the block's duration."""
        tables: list[BlockTable] = []
        try:
            for seq in tokens:
                tables.append(BlockTable(self.pool))
                tables[-1].reserve(len(seq))
            blocks, lengths = [t.blocks for t in tables], [len(t) for t in tokens]
            yield self.model.attention_batch(
                blocks, [0] * len(tables), lengths, self.pool.block_size, bulk
            )
        finally:
            for table in tables:
                table.free()

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
        return logits
