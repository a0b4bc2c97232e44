"""The gRPC request's bounds, and its drafting override as typed DraftConfig fields: a
Struct carries every number as a float, so whole ones become ints here and only here."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest

from services.common import api
from services.common.params import (
    MAX_LOGPROBS,
    MAX_STOP_STRINGS,
    MAX_STOP_TOKEN_IDS,
    MAX_TOKENS_LIMIT,
    MAX_TOP_K,
    SEED_LIMIT,
    DraftConfig,
)
from services.gen.selfspec.v1 import generation_pb2 as pb


@pytest.mark.parametrize(
    ("fields", "field"),
    [
        ({"max_tokens": MAX_TOKENS_LIMIT + 1}, "max_tokens"),
        ({"max_tokens": 2**32 - 1}, "max_tokens"),
        ({"temperature": math.nan}, "temperature"),
        ({"temperature": math.inf}, "temperature"),
        ({"temperature": 1e30}, "temperature"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_k": MAX_TOP_K + 1}, "top_k"),
        ({"seed": SEED_LIMIT}, "seed"),
        ({"seed": 2**64 - 1}, "seed"),
        ({"stop": ["x"] * (MAX_STOP_STRINGS + 1)}, "stop"),
        ({"stop_token_ids": range(MAX_STOP_TOKEN_IDS + 1)}, "stop_token_ids"),
    ],
)
def test_requests_past_the_limits_are_refused_by_name(fields, field):
    req = pb.GenerateRequest(prompt="hi", **fields)
    with pytest.raises(ValueError, match=f"^{field} "):
        api.validate(req)


def test_a_request_at_the_limits_converts():
    req = pb.GenerateRequest(
        prompt="hi",
        max_tokens=MAX_TOKENS_LIMIT,
        top_k=MAX_TOP_K,
        seed=SEED_LIMIT - 1,
        stop=["END"],
        stop_token_ids=range(MAX_STOP_TOKEN_IDS),
    )
    params = api.sampling_params(req)
    assert params.stop == ("END",) and params.stop_token_ids == tuple(range(64))
    assert params.seed == SEED_LIMIT - 1 and params.temperature == 0.0  # unset: default


def test_the_smallest_float32_temperature_is_greedy():
    params = api.sampling_params(pb.GenerateRequest(prompt="hi", temperature=1.4e-45))
    assert params.temperature > 0 and params.greedy


def override(draft: dict) -> dict | None:
    req = pb.GenerateRequest(prompt="hi")
    req.draft.update(draft)
    return api.draft_override(req)


def test_whole_struct_numbers_become_ints():
    got = override({"max_draft": 4, "skip_attn": [3, 1], "exit_layer": None, "threshold": 0})
    assert got == {"max_draft": 4, "skip_attn": (3, 1), "exit_layer": None, "threshold": 0.0}
    assert type(got["max_draft"]) is int and all(type(i) is int for i in got["skip_attn"])
    cfg = DraftConfig.parse(got, DraftConfig(mode="auto"))
    assert cfg.max_draft == 4 and cfg.skip_attn == (1, 3)


@pytest.mark.parametrize(
    ("draft", "words"),
    [
        ({"max_draft": 4.5}, "draft.max_draft must be a whole number, got 4.5"),
        ({"skip_attn": [1.5]}, "draft.skip_attn must be a whole number"),
        ({"skip_attn": 3}, "draft.skip_attn must be a list"),
        ({"shortlist": True}, "draft.shortlist"),
        ({"ngram_min": "2"}, "draft.ngram_min"),
        ({"exit_layer": 0.5}, "draft.exit_layer"),
        ({"threshold": True}, "draft.threshold must be a number"),
        ({"mode": 1}, "draft.mode must be a string"),
        ({"max_draft": 17}, "max_draft must be between 1 and 16"),
        ({"shortlist": 1e300}, "shortlist must be between 0 and"),
        ({"skip_attn": list(range(2000))}, "skip_attn has 2000 entries"),
        ({"bogus": 1}, "unknown setting 'bogus'"),
    ],
)
def test_bad_overrides_name_the_field(draft, words):
    with pytest.raises(ValueError, match="^draft") as info:
        override(draft)
    assert words in str(info.value)


def test_usage_says_when_a_request_drafted_with_the_default_or_was_preempted():
    stats = {"prompt_tokens": 5, "steps": 3, "draft_fallback": True, "preemptions": 2}
    u = api.usage(stats, completion_tokens=4)
    assert (u.prompt_tokens, u.completion_tokens, u.verify_steps) == (5, 4, 3)
    assert u.draft_fallback and u.preemptions == 2
    assert not api.usage({}, 0).draft_fallback


def test_logprobs_zero_and_min_p_arrive_as_set():
    params = api.sampling_params(pb.GenerateRequest(prompt="hi", logprobs=0, min_p=0.25))
    assert params.logprobs == 0 and params.min_p == 0.25
    assert api.sampling_params(pb.GenerateRequest(prompt="hi")).logprobs is None
    with pytest.raises(ValueError, match="^logprobs "):
        api.validate(pb.GenerateRequest(prompt="hi", logprobs=MAX_LOGPROBS + 1))
    with pytest.raises(ValueError, match="^min_p "):
        api.validate(pb.GenerateRequest(prompt="hi", min_p=1.5))


def test_chat_options_default_as_the_request_means():
    turns = [pb.Message(role="user", content="hi")]
    ask = pb.GenerateRequest(messages=pb.Messages(messages=turns))
    assert api.chat_options(ask) == {"add_generation_prompt": True, "continue_final_message": False}
    go_on = pb.TokenizeRequest(messages=pb.Messages(messages=turns, continue_final_message=True))
    assert api.chat_options(go_on) == {
        "add_generation_prompt": False,
        "continue_final_message": True,
    }
    bare = pb.Messages(messages=turns, add_generation_prompt=False)
    assert api.chat_options(pb.GenerateRequest(messages=bare))["add_generation_prompt"] is False
    assert api.chat_options(pb.GenerateRequest(prompt="hi")) == {}
    assert api.prompt(pb.TokenizeRequest(prompt="hi")) == "hi"


def test_token_logprobs_carry_each_tokens_text():
    lp = SimpleNamespace(logprob=-0.5, top=[(7, -0.5), (8, -1.5)])
    [out] = api.token_logprobs(lambda ids: f"<{ids[0]}>", [7], [lp])
    assert (out.token_id, out.token, out.logprob) == (7, "<7>", -0.5)
    assert [(t.token_id, t.token, t.logprob) for t in out.top] == [
        (7, "<7>", -0.5),
        (8, "<8>", -1.5),
    ]
    with pytest.raises(ValueError, match="token_ids"):
        api.detokenize_ids(pb.DetokenizeRequest(token_ids=[1] * (api.MAX_PROMPT_TOKEN_IDS + 1)))
