"""Teacher-forced passes, run between steps: the full model's own next-token choices
over text it has already produced, and how often a draft plan agrees with them. The
fleet scores skip-set candidates this way without extra traffic."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from services.engine.kv_pool import BlockTable, OutOfBlocks
from services.engine.model import LayerPlan

if TYPE_CHECKING:
    from services.engine.engine import Engine


def sublayer_sizes(engine: Engine) -> dict[str, float]:
    """Bytes each sublayer reads, relative to the whole model with its head."""
    m = engine.model
    hidden = m.embed.shape[1]
    attn = hidden * (m.num_heads * m.head_dim + 2 * m.kv_dim) + m.num_heads * m.head_dim * hidden
    mlp = 3 * hidden * m.config.intermediate_size
    head = m.vocab_size * hidden
    total = m.num_layers * (attn + mlp) + head
    return {"attn": attn / total, "mlp": mlp / total, "head": head / total}


@torch.inference_mode()
def full_choices(engine: Engine, tokens: list[list[int]]) -> list[torch.Tensor] | None:
    """The full model's next-token choice after every token of each sequence, in one
    pass between steps; None when the KV pool has no room to spare."""
    h = _forced_pass(engine, tokens, LayerPlan())
    return None if h is None else [x.argmax(-1) for x in h]


@torch.inference_mode()
def agreement(
    engine: Engine, tokens: list[list[int]], targets: list[torch.Tensor], start: list[int], plan
) -> tuple[int, int] | None:
    """Teacher-forced: (positions where the draft `plan` picks the full model's token,
    positions scored), over each sequence from `start[i]` on; None when no room."""
    h = _forced_pass(engine, tokens, plan)
    if h is None:
        return None
    rows = list(zip(h, targets, start, strict=True))
    hits = sum(int((x.argmax(-1)[s:] == t[s:]).sum()) for x, t, s in rows)
    return hits, sum(len(t) - s for _, t, s in rows)


def _forced_pass(engine: Engine, tokens: list[list[int]], plan) -> list[torch.Tensor] | None:
    """Logits after every token, under `plan`, in blocks borrowed from the pool."""
    m, pool = engine.model, engine.pool
    with engine._step_lock:
        tables: list[BlockTable] = []
        try:
            for seq in tokens:
                tables.append(BlockTable(pool))
                tables[-1].reserve(len(seq))
            lengths = [len(t) for t in tokens]
            blocks = [t.blocks for t in tables]
            batch = m.attention_batch(blocks, [0] * len(tables), lengths, pool.block_size, True)
            ids = torch.tensor([t for seq in tokens for t in seq], device=m.device)
            h = m.run_layers(m.embed_tokens(ids), batch, pool.kv, plan=plan, bulk=True)
            return list(m.logits(h, bulk=True).split(lengths))
        except OutOfBlocks:
            return None
        finally:
            for table in tables:
                table.free()
