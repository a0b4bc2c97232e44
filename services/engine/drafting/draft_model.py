"""The draft model (`mode: "model"`): a second, smaller model, drafting for every
sequence of a batch at once, one pass per position. With the target's tokenizer it reads
and drafts the target's ids; with another one, through `retokenize.Retokenizer`.

It keeps its KV in a pool of its own, a share of the engine's budget (`budgets`), in a
table per sequence (`Sequence.draft_table`, made on first use). A step first catches
the draft up on the tokens it has not seen (the whole prompt the first time, in chunks),
then drafts. Its cache is rolled back as the target's is: each step the table goes back
to the ids it holds that the sequence still begins with, so past the tokens the target
kept, and the step writes over the rest. A sequence whose table cannot grow drafts
nothing that step (`reserve`).

What it drafts need not match the target bit for bit: verification keeps only what the
target agrees with, and sampling ones keep the distributions they were drawn from, so
that speculative sampling stays exact.
"""

from __future__ import annotations

import weakref

import torch
import torch.nn.functional as F

from services.common.params import DraftConfig
from services.engine.drafting.proposer import Drafts
from services.engine.drafting.retokenize import Retokenizer, check_text
from services.engine.kv_pool import BlockTable, KVPool, OutOfBlocks
from services.engine.model import Model
from services.engine.sampler import probabilities, sample
from services.engine.sequence import Sequence

BULK_TOKENS = 64  # catch-up passes longer than this take the many-row products


def check_pair(
    target: Model, target_tokenizer, draft: Model, draft_tokenizer
) -> Retokenizer | None:
    """Refuse a draft model that cannot draft for `target`, saying why: it must reach as
    far as the target does, and either share its tokenizer (ids and chat template) or
    write its text back unchanged. Returns what translates between the two tokenizers,
    None where they are the same."""
    if draft.max_positions < target.max_positions:
        raise ValueError(
            f"the draft model's context is {draft.max_positions} tokens, shorter than the "
            f"target's {target.max_positions}"
        )
    same = draft.vocab_size == target.vocab_size
    if same and draft_tokenizer.get_vocab() == target_tokenizer.get_vocab():
        template = getattr(draft_tokenizer, "chat_template", None)
        target_template = getattr(target_tokenizer, "chat_template", None)
        if template and target_template and template != target_template:
            raise ValueError("the draft model's chat template differs from the target's")
        return None
    # Another tokenizer reads the target's text, chat template and all, as text.
    if len(draft_tokenizer) > draft.vocab_size:
        raise ValueError(
            f"the draft model's tokenizer has {len(draft_tokenizer)} ids and its vocabulary "
            f"{draft.vocab_size}: they are not one model's"
        )
    check_text(target_tokenizer, draft_tokenizer)
    return Retokenizer(target_tokenizer, draft_tokenizer)


def relative_reads(draft: Model, target: Model) -> float:
    """What a draft pass reads of weights, relative to a target's pass: the prior of its
    cost, before the engine has timed one."""

    def reads(m: Model) -> int:
        c = m.config
        h, inter = c.hidden_size, c.intermediate_size
        attention = h * m.num_heads * m.head_dim * 2 + h * m.kv_dim * 2
        return m.num_layers * (attention + 3 * h * inter) + m.vocab_size * h

    return reads(draft) / reads(target)


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

    def __init__(
        self, model: Model, pool: KVPool, chunk: int, retokenizer: Retokenizer | None = None
    ) -> None:
        """`chunk`: the most tokens of one sequence a catch-up pass takes; `retokenizer`:
        where the draft's tokenizer is not the target's (`check_pair`)."""
        self.model = model
        self.pool = pool
        self.chunk = chunk
        self.retokenizer = retokenizer
        # Per sequence, the draft ids its table's tokens are the first of.
        self._held: weakref.WeakKeyDictionary[Sequence, list[int]] = weakref.WeakKeyDictionary()

    def reserve(self, seq: Sequence, k: int) -> bool:
        """Room in `seq`'s draft table for drafting `k` tokens; where the pool (or the
        draft's context) has none, the sequence lets go of its table (others draft on)
        and drafts nothing now."""
        context = self.retokenizer.context(seq) if self.retokenizer else seq.tokens
        if seq.draft_table is None:
            seq.draft_table = BlockTable(self.pool)
        table = seq.draft_table
        kept = common_prefix(self._held.get(seq, []), context, table.num_tokens)
        # The newest token always runs again: its pass gives the first drafted token.
        table.commit(min(kept, len(context) - 1))
        self._held[seq] = context
        try:
            if len(context) + k > self.model.max_positions:
                raise OutOfBlocks("past the draft model's context")
            table.reserve(len(context) + k)
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
        if self.retokenizer and any(leads):
            raise ValueError("a draft model with another tokenizer continues no proposal")
        tokens = [list(p) for p in leads]
        probs = [self._point_masses(s, p) for s, p in zip(seqs, leads, strict=True)]
        confidence: list[list[float]] = [[] for _ in seqs]
        dropped: list[tuple[int, float] | None] = [None] * len(seqs)
        contexts = [self._held[s] for s in seqs]
        # What each draft cache lacks: its context from its committed length on.
        rows = [
            c[s.draft_table.num_tokens :] + p
            for s, c, p in zip(seqs, contexts, tokens, strict=True)
        ]
        active = [i for i, m in enumerate(lengths) if m > len(tokens[i])]
        steady = all(len(rows[i]) <= 2 * cfg.max_draft + 1 for i in active)
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
        for s, c, t in zip(seqs, contexts, tokens, strict=True):
            self._held[s] = c + t  # the drafted ids it ran are held past the context
        if self.retokenizer:
            tokens = [
                self.retokenizer.to_target(s, c, t)[:m]
                for s, c, t, m in zip(seqs, contexts, tokens, lengths, strict=True)
            ]
            confidence, dropped = [[] for _ in seqs], [None] * len(seqs)
        q = [torch.stack(p) if p else None for p in probs]
        prefix = [len(p) for p in leads]
        return Drafts(tokens, None, 0, q, confidence, dropped, prefix, passes, steady=steady)

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
            # Across tokenizers the draft's distributions are over other ids: greedy.
            if seq.params.greedy or self.retokenizer:
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


def common_prefix(a: list[int], b: list[int], limit: int) -> int:
    """How many first ids `a` and `b` share, up to `limit`: by halving, each test one
    comparison of slices (at C speed), since the two mostly agree far past the first."""
    lo, hi = 0, min(len(a), len(b), limit)
    if a[:hi] == b[:hi]:
        return hi
    while lo < hi:  # a[:lo] == b[:lo], a[:hi + 1] != b[:hi + 1] at most
        mid = (lo + hi + 1) // 2
        if a[:mid] == b[:mid]:
            lo = mid
        else:
            hi = mid - 1
    return lo
