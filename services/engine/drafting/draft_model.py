"""The draft model (`mode: "model"`): a second, smaller model with the target's
tokenizer, drafting for every sequence of a batch at once, one pass per position.

It keeps its KV in a pool of its own, a share of the engine's budget (`budgets`), in a
table per sequence (`Sequence.draft_table`, made on first use). A step first catches
the draft up on the tokens it has not seen (the whole prompt the first time, in chunks),
then drafts. Its cache is rolled back as the target's is: after verification the table
goes back to the tokens the target kept (`keep`), and the next step writes over the
rest. A sequence whose table cannot grow drafts nothing that step (`reserve`).

What it drafts need not match the target bit for bit: verification keeps only what the
target agrees with, and sampling ones keep the distributions they were drawn from, so
that speculative sampling stays exact.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from services.common.params import DraftConfig
from services.engine.drafting.proposer import Drafts
from services.engine.kv_pool import BlockTable, KVPool, OutOfBlocks
from services.engine.model import Model
from services.engine.sampler import probabilities, sample
from services.engine.sequence import Sequence

BULK_TOKENS = 64  # catch-up passes longer than this take the many-row products


def check_pair(target: Model, target_tokenizer, draft: Model, draft_tokenizer) -> None:
    """Refuse a draft model that cannot draft for `target`, saying why: its token ids
    must mean the same, and it must reach as far as the target does."""
    if draft.vocab_size != target.vocab_size:
        raise ValueError(
            f"the draft model's vocabulary has {draft.vocab_size} ids and the target's "
            f"{target.vocab_size}; a draft model must have the target's tokenizer"
        )
    if draft_tokenizer.get_vocab() != target_tokenizer.get_vocab():
        raise ValueError(
            "the draft model's tokenizer maps tokens to other ids than the target's; "
            "a draft model must have the target's tokenizer"
        )
    if draft.max_positions < target.max_positions:
        raise ValueError(
            f"the draft model's context is {draft.max_positions} tokens, shorter than the "
            f"target's {target.max_positions}"
        )
    template = getattr(draft_tokenizer, "chat_template", None)
    target_template = getattr(target_tokenizer, "chat_template", None)
    if template and target_template and template != target_template:
        raise ValueError("the draft model's chat template differs from the target's")


def kv_bytes_per_token(model: Model) -> int:
    itemsize = torch.empty((), dtype=model.kv_dtype).element_size()
    return model.num_layers * 2 * model.kv_dim * itemsize


def budgets(total: int, target: Model, draft: Model) -> tuple[int, int]:
    """(target's, draft's) bytes of a KV budget: in proportion to their KV per token, so
    that both pools hold as many tokens, since every sequence needs both."""
    t, d = kv_bytes_per_token(target), kv_bytes_per_token(draft)
    share = total * d // (t + d)
    return total - share, share


class DraftModel:
    """A `Proposer` running a model of its own, in a KV pool of its own."""

    def __init__(self, model: Model, pool: KVPool, chunk: int) -> None:
        """`chunk`: the most tokens of one sequence a catch-up pass takes."""
        self.model = model
        self.pool = pool
        self.chunk = chunk

    def reserve(self, seq: Sequence, k: int) -> bool:
        """Room in `seq`'s draft table for drafting `k` tokens; where the pool has none,
        the sequence lets go of its table (others draft on) and drafts nothing now."""
        if seq.draft_table is None:
            seq.draft_table = BlockTable(self.pool)
        # The newest token always runs again: its pass gives the first drafted token.
        seq.draft_table.commit(min(seq.draft_table.num_tokens, seq.num_tokens - 1))
        try:
            seq.draft_table.reserve(seq.num_tokens + k)
        except OutOfBlocks:
            seq.free_draft()
            return False
        return True

    @torch.inference_mode()
    def propose(
        self, seqs: list[Sequence], cfg: DraftConfig, lengths: list[int], leads: list[list[int]]
    ) -> Drafts:
        """Up to `lengths[i]` tokens for `seqs[i]` after `leads[i]`, stopping where the
        draft's top probability falls under `cfg.threshold`. Tables come `reserve`d."""
        tokens = [list(p) for p in leads]
        probs = [self._point_masses(s, p) for s, p in zip(seqs, leads, strict=True)]
        confidence: list[list[float]] = [[] for _ in seqs]
        dropped: list[tuple[int, float] | None] = [None] * len(seqs)
        # What each draft cache lacks: its sequence's tokens from its committed length on.
        rows = [s.tokens[s.draft_table.num_tokens :] + p for s, p in zip(seqs, tokens, strict=True)]
        active = [i for i, m in enumerate(lengths) if m > len(tokens[i])]
        passes = self._catch_up([seqs[i] for i in active], [rows[i] for i in active])
        while active:
            passes += 1
            h = self._run([seqs[i] for i in active], [rows[i] for i in active])
            picks = self._pick(h, [seqs[i] for i in active])
            still = []
            for i, (tok, conf, q) in zip(active, picks, strict=True):
                if conf < cfg.threshold:
                    dropped[i] = (tok, conf)  # not proposed: drafting stops
                    continue
                tokens[i].append(tok)
                confidence[i].append(conf)
                if q is not None:
                    probs[i].append(q)
                rows[i] = [tok]
                if len(tokens[i]) < lengths[i]:
                    still.append(i)
            active = still
        q = [torch.stack(p) if p else None for p in probs]
        prefix = [len(p) for p in leads]
        return Drafts(tokens, None, 0, q, confidence, dropped, prefix, passes)

    def _catch_up(self, seqs: list[Sequence], rows: list[list[int]]) -> int:
        """Write all but the last `chunk` of each sequence's `rows` (taken off them), a
        chunk a pass, so that the first drafting pass is short; returns the passes."""
        passes = 0
        while True:
            long = [i for i, r in enumerate(rows) if len(r) > self.chunk]
            if not long:
                return passes
            parts = [rows[i][: min(self.chunk, len(rows[i]) - self.chunk)] for i in long]
            self._run([seqs[i] for i in long], parts)
            for i, part in zip(long, parts, strict=True):
                del rows[i][: len(part)]  # the caller's own lists
            passes += 1

    def _run(self, seqs: list[Sequence], rows: list[list[int]]) -> torch.Tensor:
        """Each sequence's `rows` through the draft model into its draft table, committed;
        the hidden states after each sequence's last row."""
        tables = [s.draft_table for s in seqs]
        lengths = [len(r) for r in rows]
        bulk = sum(lengths) > BULK_TOKENS
        batch = self.model.attention_batch(
            [t.blocks for t in tables],
            [t.num_tokens for t in tables],
            lengths,
            self.pool.block_size,
            bulk,
        )
        ids = torch.tensor([t for r in rows for t in r], dtype=torch.long, device=self.model.device)
        h = self.model.run_layers(self.model.embed_tokens(ids), batch, self.pool.kv, bulk=bulk)
        for table, n in zip(tables, lengths, strict=True):
            table.commit(table.num_tokens + n)
        ends = torch.tensor(lengths, device=h.device).cumsum(0) - 1
        return h[ends]

    def _pick(self, h: torch.Tensor, seqs: list[Sequence]):
        """Per sequence: (drafted token, the draft's confidence in it, the distribution it
        was sampled from, None when greedy)."""
        logits = self.model.logits(h)
        greedy = torch.softmax(logits, -1).max(-1)
        picks = []
        for j, seq in enumerate(seqs):
            if seq.params.greedy:
                picks.append((int(greedy.indices[j]), float(greedy.values[j]), None))
                continue
            q = probabilities(logits[j], seq.params)
            picks.append((sample(q, seq.generator), float(q.max()), q))
        return picks

    def _point_masses(self, seq: Sequence, lead: list[int]) -> list[torch.Tensor]:
        """Tokens proposed ahead of the draft were certain: point masses (sampling only)."""
        if seq.params.greedy or not lead:
            return []
        ids = torch.tensor(lead, dtype=torch.long, device=self.model.device)
        return list(F.one_hot(ids, self.model.vocab_size).float().unbind(0))


def keep(seq: Sequence, kept: int) -> None:
    """Roll the draft cache back to the first `kept` tokens of `seq`, which the target
    kept: past them, it holds drafts the target rejected."""
    if seq.draft_table is not None:
        seq.draft_table.commit(min(seq.draft_table.num_tokens, kept))
