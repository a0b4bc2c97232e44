"""What one sequence drafts in one step: a typed plan, chosen before any model pass.

The `auto` policy chooses a plan per sequence; the other modes of `DraftConfig` map to
one plan each (`fixed`). The runner drafts by the plans, and acceptance is learnt and
counted by them. `name` is the plan's key in telemetry and the fleet's records.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

from services.common.params import DraftConfig
from services.common.speedup import LAYER_MODES
from services.engine.drafting.ngram import ngram_proposal


class Kind(Enum):
    OFF = "off"  # no draft: a plain decode step
    NGRAM = "ngram"  # the n-gram proposal alone
    LAYER = "layer"  # the layer draft alone
    NGRAM_LAYER = "ngram+layer"  # the n-gram proposal, continued by the layer draft
    MODEL = "model"  # the engine's draft model (`drafting.draft_model`)


@dataclass(frozen=True)
class DraftPlan:
    kind: Kind = Kind.OFF
    k: int = 0  # the most tokens to draft
    layer: str | None = None  # the layer draft of layer kinds: `skip` or `early_exit`
    proposal: tuple[int, ...] = ()  # the n-gram proposal of n-gram kinds

    def __post_init__(self) -> None:
        if (self.layer in LAYER_MODES) != (self.kind in (Kind.LAYER, Kind.NGRAM_LAYER)):
            raise ValueError(f"a {self.kind.value} plan with layer draft {self.layer!r}")

    @property
    def name(self) -> str:
        """`off`, `ngram`, `model`, the layer mode, or `ngram+` it."""
        if self.kind is Kind.LAYER:
            return self.layer
        if self.kind is Kind.NGRAM_LAYER:
            return f"ngram+{self.layer}"
        return self.kind.value

    @property
    def lead(self) -> tuple[int, ...]:
        """The n-gram tokens the draft starts with; a continued proposal leaves the layer
        draft at least its last token."""
        if self.kind is Kind.NGRAM:
            return self.proposal[: self.k]
        if self.kind is Kind.NGRAM_LAYER:
            return self.proposal[: self.k - 1]
        return ()

    @property
    def layered(self) -> bool:
        """Whether the layer draft runs for it."""
        return self.layer is not None and self.k > 0


OFF = DraftPlan()


def fixed(cfg: DraftConfig, tokens: list[int], room: int) -> DraftPlan:
    """The plan of a mode other than `auto`: as much as there is room for."""
    if room == 0 or cfg.mode == "off":
        return OFF
    if cfg.mode == "ngram":
        found = ngram_proposal(tokens, room, cfg.ngram_min, cfg.ngram_max)
        return DraftPlan(Kind.NGRAM, room, proposal=tuple(found))
    if cfg.mode == "model":
        return DraftPlan(Kind.MODEL, room)
    return DraftPlan(Kind.LAYER, room, layer=cfg.mode)
