"""The drafting decision for one model: per batch bucket, the mode and draft length
that maximise expected tokens per second, by the engine's own speedup model.

For each bucket with enough steps under the current config: the layer draft's (its
skip set or early exit) expected speedup from its measured acceptance per draft
position (or, before it has any, its teacher-forced agreement) and measured costs;
n-gram's from its measured acceptance; a draft model's (mode `model`, only for a model
whose replicas all load one) from its measured acceptance and its pass's cost (measured,
or the controller's prior); plain decoding is 1. Drafting is off where nothing beats 1,
`auto` where two drafters pay (the engine then picks per sequence).
A bucket changes its choice only for a clear gain, so versions do not flap on noise.
Where the layer draft runs, the confidence threshold is set from its measured
acceptance by draft confidence: drafting stops where tokens are shown not to pay.
"""

from __future__ import annotations

from dataclasses import dataclass

from services.common.params import MAX_DRAFT_TOKENS
from services.common.speedup import LAYER_MODES, best_length, speedup_at
from services.controller.evidence import ModelEvidence, Z, wilson

MODES = ("off", "ngram", "skip", "early_exit", "model", "auto")
SWITCH_GAIN = 1.03  # a bucket's choice changes only for a predicted gain of 3%
MIN_STEPS = 20  # steps a bucket needs under the current config before it is decided
MIN_TOLD = 30  # tokens a confidence bin needs before it may raise the threshold


@dataclass(frozen=True)
class Choice:
    mode: str
    max_draft: int
    speedup: float
    threshold: float | None = None  # where a layer draft stops for low confidence


def forced_speedup(alpha: float, draft_cost: float, token_cost: float) -> tuple[float, int]:
    """Best (speedup, k) with k >= 1, drafts accepted independently with probability
    `alpha`: ranks skip sets even where no draft pays, so the search still climbs."""
    return best_length([alpha] * MAX_DRAFT_TOKENS, draft_cost, token_cost, plain=False)


def choose_bucket(
    evidence: ModelEvidence,
    version: int,
    b: int,
    layer: str,
    layer_rates: list[float] | None,
    layer_draft_cost: float,
    allowed: tuple[str, ...],
    previous: Choice | None,
    model_draft_cost: float | None = None,
) -> Choice | None:
    """The choice for bucket `b`, or None without enough evidence. `layer`: the layer
    draft's mode (`skip` or `early_exit`); `layer_rates`: its acceptance per position
    (None: unknown); `layer_draft_cost`: its pass relative to a plain step;
    `model_draft_cost`: the draft model's pass relative to a plain step (None: the
    replicas have no draft model, and `model` does not compete)."""
    if evidence.steps(version, b) < MIN_STEPS:
        return None
    _, token_cost = evidence.relative_costs(layer, b)
    curves = {}  # mode -> (acceptance per position, draft cost)
    if layer_rates:
        curves[layer] = (layer_rates, layer_draft_cost)
    ngram = evidence.stats(version, "ngram", b).rates()
    if ngram:
        curves["ngram"] = (ngram, 0.0)
    drafted = evidence.stats(version, "model", b).rates()
    if drafted and model_draft_cost is not None:
        curves["model"] = (drafted, model_draft_cost)
    options = {"off": Choice("off", 1, 1.0)}
    for mode, (rates, cost) in curves.items():
        gain, k = best_length(rates, cost, token_cost)
        options[mode] = Choice(mode, max(k, 1), gain)
    paying = [options[m] for m in (layer, "ngram", "model") if m in options]
    paying = [c for c in paying if c.speedup > 1]
    if len(paying) >= 2:  # two drafters pay: the engine picks per sequence
        k = max(c.max_draft for c in paying)
        options["auto"] = Choice("auto", k, max(c.speedup for c in paying))
    options = {m: c for m, c in options.items() if m in allowed}
    if not options:
        return None
    best = max(options.values(), key=lambda c: (c.speedup, c.mode == "auto"))
    if previous is not None and previous.mode in options:
        held = _value(previous, curves, token_cost)
        if best.speedup < held.speedup * SWITCH_GAIN:
            return held
    return best


def _value(choice: Choice, curves: dict, token_cost: float) -> Choice:
    """A previous choice (mode and length) valued on today's evidence."""
    modes = (*LAYER_MODES, "ngram", "model") if choice.mode == "auto" else (choice.mode,)
    values = [speedup_at(*curves[m], token_cost, choice.max_draft) for m in modes if m in curves]
    return Choice(choice.mode, choice.max_draft, max(values, default=1.0))


def threshold(
    confidence: tuple[list[int], list[int]] | None,
    draft_cost: float,
    token_cost: float,
    speedup: float,
) -> float:
    """The confidence under which a layer draft should stop drafting: the lowest bin edge
    above which no bin is shown not to pay. A drafted token pays, to first order, when
    its acceptance beats its cost (a draft pass and a verified token, relative to a plain
    step) times the speedup drafting already gives; a bin is shown not to pay when even
    its agreement's upper confidence bound falls short of that."""
    if not confidence:
        return 0.0
    tokens, agreed = confidence
    need = (draft_cost + token_cost) * max(speedup, 1.0)
    edge = len(tokens)
    for i in reversed(range(len(tokens))):
        if tokens[i] >= MIN_TOLD and wilson(agreed[i], tokens[i], -Z) < need:
            break
        edge = i
    return round(min(edge, len(tokens) - 1) / len(tokens), 2)


def compose(base: dict, choices: dict[int, Choice]) -> tuple[dict, dict[str, dict]]:
    """The record's draft and bucket overrides from per-bucket choices: the busiest
    bucket's choice is the base (the first listed), every bucket overrides its own
    mode, length and threshold, and the base drafts as far as any bucket."""
    if not choices:
        return base, {}
    first = next(iter(choices.values()))
    longest = max(c.max_draft for c in choices.values())
    draft = {**base, "mode": first.mode, "max_draft": longest}
    if first.threshold is not None:
        draft["threshold"] = first.threshold
    buckets = {}
    for b, c in sorted(choices.items()):
        buckets[str(b)] = {"mode": c.mode, "max_draft": c.max_draft}
        if c.threshold is not None:
            buckets[str(b)]["threshold"] = c.threshold
    return draft, buckets
