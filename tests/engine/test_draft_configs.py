"""Per-request drafting is bounded: a step runs at most `max_draft_configs` distinct
configs (the rest draft with the default and say so), and servers can refuse it."""

from __future__ import annotations

import asyncio

import pytest
from engine_helpers import Case, assert_no_blocks_held, run_together

from services.engine import DraftConfig, SamplingParams

PARAMS = SamplingParams(max_tokens=6, ignore_eos=True)
PROMPTS = ["hi", "Say OK.", "Name two planets.", "What is the capital of France?"]


def test_configs_past_the_cap_draft_with_the_default(bf16_engine):
    eng = bf16_engine
    own = [None] + [DraftConfig(mode="ngram", max_draft=n) for n in (2, 3, 4)]
    expected = [s.output for s in run_together(eng, [Case(p, PARAMS, "off") for p in PROMPTS])]
    eng.max_draft_configs = 2  # the default and one other
    try:
        seqs = run_together(eng, [Case(p, PARAMS, d) for p, d in zip(PROMPTS, own, strict=True)])
    finally:
        eng.max_draft_configs = 4
    assert [s.output for s in seqs] == expected
    assert [s.stats.as_dict()["draft_fallback"] for s in seqs] == [False, False, True, True]
    assert_no_blocks_held(eng)


def test_a_server_can_refuse_per_request_drafting(bf16_engine):
    eng = bf16_engine

    async def served(draft) -> list[int]:
        return [t async for d in eng.submit("hi", PARAMS, draft, chat=True) for t in d.token_ids]

    eng.allow_draft_override = False
    try:
        with pytest.raises(ValueError, match="allow_draft_override"):
            asyncio.run(served("ngram"))
        assert len(asyncio.run(served(None))) == PARAMS.max_tokens  # no override: served
    finally:
        eng.allow_draft_override = True
    assert_no_blocks_held(eng)
