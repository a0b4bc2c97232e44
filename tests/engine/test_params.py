"""Request and drafting parameters: exact types, documented limits, errors that name the
field (issue 18, items 1, 5 and 7)."""

from __future__ import annotations

import math

import pytest

from services.common.params import (
    GREEDY_BELOW,
    MAX_DRAFT_TOKENS,
    MAX_N,
    MAX_SHORTLIST,
    MAX_SKIP_LAYERS,
    MAX_STOP_CHARS,
    MAX_STOP_STRINGS,
    MAX_STOP_TOKEN_IDS,
    MAX_TEMPERATURE,
    MAX_TOKENS_LIMIT,
    MAX_TOP_K,
    SEED_LIMIT,
    DraftConfig,
    SamplingParams,
)
from services.engine import sampler
from services.engine.drafting import layer, step

BAD_SAMPLING = [
    ("max_tokens", 4.0),
    ("max_tokens", True),
    ("max_tokens", "4"),
    ("max_tokens", MAX_TOKENS_LIMIT + 1),
    ("temperature", True),
    ("temperature", "0.5"),
    ("temperature", None),
    ("temperature", -1e-9),
    ("temperature", MAX_TEMPERATURE + 0.5),
    ("temperature", math.inf),
    ("temperature", 10**400),
    ("top_p", 0),
    ("top_p", 1.0000001),
    ("top_p", True),
    ("top_p", "1"),
    ("top_p", math.nan),
    ("top_k", 1.0),
    ("top_k", True),
    ("top_k", -1),
    ("top_k", MAX_TOP_K + 1),
    ("seed", 7.0),
    ("seed", False),
    ("seed", "7"),
    ("seed", -1),
    ("seed", SEED_LIMIT),
    ("stop", None),
    ("stop", [1]),
    ("stop", [None]),
    ("stop", [""]),
    ("stop", ["x" * (MAX_STOP_CHARS + 1)]),
    ("stop", ["x"] * (MAX_STOP_STRINGS + 1)),
    ("stop_token_ids", 5),
    ("stop_token_ids", "12"),
    ("stop_token_ids", [True]),
    ("stop_token_ids", [2.0]),
    ("stop_token_ids", [-1]),
    ("stop_token_ids", list(range(MAX_STOP_TOKEN_IDS + 1))),
    ("ignore_eos", 1),
    ("n", 0),
    ("n", 2.0),
    ("n", True),
    ("n", "2"),
    ("n", MAX_N + 1),
    ("n", 2),  # greedy: every choice the same
]


@pytest.mark.parametrize(("field", "value"), BAD_SAMPLING)
def test_bad_sampling_values_are_refused_by_name(field, value):
    with pytest.raises(ValueError, match=f"^{field} "):
        SamplingParams(**{field: value})


def test_sampling_limits_are_inclusive_and_values_normalised():
    p = SamplingParams(
        max_tokens=MAX_TOKENS_LIMIT,
        temperature=int(MAX_TEMPERATURE),
        top_p=1,
        top_k=MAX_TOP_K,
        seed=SEED_LIMIT - 1,
        stop=["x" * MAX_STOP_CHARS] * MAX_STOP_STRINGS,
        stop_token_ids=list(range(MAX_STOP_TOKEN_IDS)),
        n=MAX_N,
    )
    assert type(p.temperature) is float and type(p.top_p) is float
    assert isinstance(p.stop, tuple) and isinstance(p.stop_token_ids, tuple)
    assert SamplingParams(stop="END").stop == ("END",)  # one string is one stop string


def test_several_choices_need_sampling():
    with pytest.raises(ValueError, match="greedy choices would all be the same"):
        SamplingParams(n=2, temperature=GREEDY_BELOW / 2)
    assert SamplingParams(n=2, temperature=GREEDY_BELOW).n == 2


def test_temperatures_under_the_epsilon_are_greedy():
    assert SamplingParams(temperature=1.4e-45).greedy
    assert SamplingParams(temperature=GREEDY_BELOW / 2).greedy
    assert not SamplingParams(temperature=GREEDY_BELOW).greedy


BAD_DRAFT = [
    ("mode", None),
    ("mode", 1),
    ("mode", ["skip"]),
    ("skip_attn", 3),
    ("skip_attn", "12"),
    ("skip_attn", {1, 2}),
    ("skip_attn", [1.0]),
    ("skip_attn", [True]),
    ("skip_mlp", [None]),
    ("skip_mlp", list(range(MAX_SKIP_LAYERS + 1))),
    ("exit_layer", 2.0),
    ("exit_layer", True),
    ("exit_layer", "3"),
    ("exit_layer", 0),
    ("max_draft", 4.5),
    ("max_draft", 4.0),
    ("max_draft", True),
    ("max_draft", None),
    ("max_draft", MAX_DRAFT_TOKENS + 1),
    ("threshold", True),
    ("threshold", "0.5"),
    ("threshold", None),
    ("threshold", math.nan),
    ("threshold", 1),
    ("shortlist", 256.0),
    ("shortlist", False),
    ("shortlist", -1),
    ("shortlist", MAX_SHORTLIST + 1),
    ("ngram_max", 4.0),
    ("ngram_max", 17),
    ("ngram_min", True),
    ("ngram_min", 5),  # above ngram_max
]


@pytest.mark.parametrize(("field", "value"), BAD_DRAFT)
def test_bad_draft_values_are_refused_by_name(field, value):
    with pytest.raises(ValueError, match=field):
        DraftConfig(**{field: value})
    with pytest.raises(ValueError, match=field):  # a dict override is checked alike
        DraftConfig.parse({field: value}, DraftConfig())


def test_values_in_messages_are_shortened():
    """A request may send megabytes; its error message stays a line."""
    with pytest.raises(ValueError, match="draft mode") as info:
        DraftConfig(mode="x" * 100_000)
    assert len(str(info.value)) < 200
    with pytest.raises(ValueError, match="stop") as info:
        SamplingParams(stop=["x" * 100_000])
    assert len(str(info.value)) < 200


def test_draft_values_are_normalised():
    cfg = DraftConfig(skip_attn=[9, 3, 3], threshold=0)
    assert cfg.skip_attn == (3, 9) and type(cfg.threshold) is float
    assert DraftConfig(skip_attn=list(range(MAX_SKIP_LAYERS))).skip_attn[-1] == 1023


def test_layers_are_checked_in_auto_too():
    """`auto` runs an early exit when it names no skip set, so its exit layer must exist."""
    with pytest.raises(ValueError, match="exit_layer must be between 1 and 29"):
        DraftConfig(mode="auto", exit_layer=30).check_layers(30)
    every = tuple(range(30))
    with pytest.raises(ValueError, match="every sublayer"):
        DraftConfig(mode="auto", skip_attn=every, skip_mlp=every).check_layers(30)
    DraftConfig(mode="auto", exit_layer=29).check_layers(30)


def test_tiny_temperatures_decode_greedily_without_the_sampler(engine, monkeypatch):
    """1.4e-45 overflowed the logits to inf and every sampling step failed."""
    prompts = ["Name three colours.", "hi"]
    greedy = engine.generate(prompts, SamplingParams(max_tokens=4, ignore_eos=True))

    def refuse(*args):
        raise AssertionError("a greedy request reached the sampler")

    monkeypatch.setattr(step, "probabilities", refuse)
    monkeypatch.setattr(layer, "probabilities", refuse)
    monkeypatch.setattr(sampler, "probabilities", refuse)
    tiny = SamplingParams(max_tokens=4, ignore_eos=True, temperature=1.4e-45, seed=3)
    for draft in ("off", "ngram", None):  # None: the default, a layer draft
        outs = engine.generate(prompts, tiny, draft)
        assert [o.finish_reason for o in outs] == ["length", "length"], draft
        assert [o.token_ids for o in outs] == [g.token_ids for g in greedy], draft
    assert engine.stats()["kv_blocks_in_use"] == 0
