"""Teacher-forced scoring: over text the full model already produced, how often a draft
plan's next-token choice agrees with the full model's, without generating. The tuner
searches skip sets this way offline, and a serving replica scores the fleet's
candidates between steps (wrap the calls in `Engine.between_steps` there)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from services.engine.model import FULL, LayerPlan

if TYPE_CHECKING:
    from services.engine.engine import Engine
    from services.engine.runner import ModelRunner


def sublayer_sizes(engine: Engine) -> dict[str, float]:
    """Bytes each sublayer reads, relative to the whole model with its head."""
    m = engine.model
    hidden = m.config.hidden_size
    attn = hidden * (m.num_heads * m.head_dim + 2 * m.kv_dim) + m.num_heads * m.head_dim * hidden
    mlp = 3 * hidden * m.config.intermediate_size
    head = m.vocab_size * hidden
    total = m.num_layers * (attn + mlp) + head
    return {"attn": attn / total, "mlp": mlp / total, "head": head / total}


@torch.inference_mode()
def full_choices(
    runner: ModelRunner, tokens: list[list[int]], start: list[int]
) -> list[torch.Tensor] | None:
    """The full model's next-token choice after each token of each sequence from
    `start[i]` on, in one pass; None when the KV pool has no room to spare."""
    logits = runner.forced(tokens, FULL, start)
    return None if logits is None else [x.argmax(-1) for x in logits]


@torch.inference_mode()
def hits(
    runner: ModelRunner,
    tokens: list[list[int]],
    targets: list[torch.Tensor | list[int]],
    start: list[int],
    plan: LayerPlan,
    shortlist: int = 0,
) -> list[torch.Tensor] | None:
    """Teacher-forced, in one pass: per sequence, whether the draft `plan` picks the target
    at each position scored. `targets[i][j]`: the full model's token after token
    `start[i] + j` of sequence i. `shortlist`: the draft's head covers the ids below it
    and the sequence's own (all of it: a slight superset of what the draft saw). None
    when the KV pool has no room to spare."""
    logits = runner.forced(tokens, plan, start)
    if logits is None:
        return None
    out = []
    for x, seq, target in zip(logits, tokens, targets, strict=True):
        x = x[: len(target)]
        if shortlist:
            allowed = torch.zeros(x.shape[-1], dtype=torch.bool, device=x.device)
            allowed[:shortlist] = True
            allowed[torch.tensor(seq, device=x.device)] = True
            x = x.masked_fill(~allowed, float("-inf"))
        out.append(x.argmax(-1) == torch.as_tensor(target, device=x.device))
    return out


def agreement(
    runner: ModelRunner,
    tokens: list[list[int]],
    targets: list[torch.Tensor | list[int]],
    start: list[int],
    plan: LayerPlan,
    shortlist: int = 0,
) -> tuple[int, int] | None:
    """`hits` counted: (positions where the draft picks the target, positions scored)."""
    got = hits(runner, tokens, targets, start, plan, shortlist)
    if got is None:
        return None
    return sum(int(h.sum()) for h in got), sum(len(t) for t in targets)
