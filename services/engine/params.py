"""What a caller asks for: how to sample, and how to draft. Validated on creation."""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

DRAFT_MODES = ("off", "skip", "early_exit", "ngram", "auto")
MAX_DRAFT_TOKENS = 16


@dataclass(frozen=True)
class SamplingParams:
    """Sampling settings, named as in vLLM."""

    max_tokens: int = 16
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "stop", tuple(self.stop))
        object.__setattr__(self, "stop_token_ids", tuple(self.stop_token_ids))
        if isinstance(self.max_tokens, bool) or not isinstance(self.max_tokens, int):
            raise ValueError(f"max_tokens must be an integer, got {self.max_tokens!r}")
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens must be at least 1, got {self.max_tokens}")
        if not math.isfinite(self.temperature) or self.temperature < 0:
            raise ValueError(f"temperature must be finite and >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 means no limit), got {self.top_k}")
        if len(self.stop) > 16 or any(not s or len(s) > 256 for s in self.stop):
            raise ValueError("stop takes at most 16 strings of 1 to 256 characters")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


@dataclass(frozen=True)
class DraftConfig:
    """How to draft tokens for verification.

    `skip`: run the model without the attention sublayers in `skip_attn` and the MLP
    sublayers in `skip_mlp`. `early_exit`: run the first `exit_layer` layers, then
    the LM head. `ngram`: copy what followed the latest match of the recent tokens.
    Drafting stops before `max_draft` tokens once the draft's top probability falls
    under `threshold`. `shortlist` > 0 gives the draft an LM head over token ids
    below it plus the ids already in the context.
    """

    mode: str = "skip"
    skip_attn: tuple[int, ...] = ()
    skip_mlp: tuple[int, ...] = ()
    exit_layer: int | None = None
    max_draft: int = 4
    threshold: float = 0.0
    shortlist: int = 0
    ngram_max: int = 4
    ngram_min: int = 1

    def __post_init__(self) -> None:
        object.__setattr__(self, "skip_attn", tuple(sorted(set(self.skip_attn))))
        object.__setattr__(self, "skip_mlp", tuple(sorted(set(self.skip_mlp))))
        if self.mode not in DRAFT_MODES:
            raise ValueError(
                f"draft mode must be one of {', '.join(DRAFT_MODES)}; got {self.mode!r}"
            )
        if not 1 <= self.max_draft <= MAX_DRAFT_TOKENS:
            raise ValueError(
                f"max_draft must be between 1 and {MAX_DRAFT_TOKENS}, got {self.max_draft}"
            )
        if not 0 <= self.threshold < 1:
            raise ValueError(f"threshold must be in [0, 1), got {self.threshold}")
        if self.shortlist < 0:
            raise ValueError(f"shortlist must be >= 0, got {self.shortlist}")
        if not 1 <= self.ngram_min <= self.ngram_max <= 16:
            raise ValueError("ngram sizes need 1 <= ngram_min <= ngram_max <= 16")

    @property
    def layer_mode(self) -> str | None:
        """The layer draft this config runs, if any: `auto` uses what its fields describe."""
        if self.mode in ("skip", "early_exit"):
            return self.mode
        if self.mode == "auto":
            if self.skip_attn or self.skip_mlp:
                return "skip"
            if self.exit_layer is not None:
                return "early_exit"
        return None

    def check_layers(self, num_layers: int) -> None:
        """Refuse layer numbers the model does not have, and skipping everything."""
        for name in ("skip_attn", "skip_mlp"):
            bad = [i for i in getattr(self, name) if not 0 <= i < num_layers]
            if bad:
                raise ValueError(
                    f"{name} names layers {bad}; the model has layers 0..{num_layers - 1}"
                )
        if self.mode == "skip":
            if not self.skip_attn and not self.skip_mlp:
                raise ValueError("mode 'skip' needs at least one layer in skip_attn or skip_mlp")
            if len(self.skip_attn) == num_layers and len(self.skip_mlp) == num_layers:
                raise ValueError("a skip set may not skip every sublayer; nothing would be drafted")
        if self.mode == "early_exit" and (
            self.exit_layer is None or not 1 <= self.exit_layer < num_layers
        ):
            raise ValueError(f"early_exit needs exit_layer between 1 and {num_layers - 1}")

    @classmethod
    def parse(cls, value: DraftConfig | str | dict | None, default: DraftConfig) -> DraftConfig:
        """A config from a config, a mode name (taking the rest from `default`), or a dict."""
        if value is None:
            return default
        if isinstance(value, DraftConfig):
            return value
        if isinstance(value, str):
            return replace(default, mode=value)
        if isinstance(value, dict):
            unknown = set(value) - set(cls.__dataclass_fields__)
            if unknown:
                raise ValueError(f"unknown draft settings: {', '.join(sorted(unknown))}")
            return replace(default, **value)
        raise ValueError(f"draft must be a DraftConfig, a mode name or a dict, not {type(value)}")
