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


@pytest.mark.parametrize("default", [DraftConfig(mode="ngram"), None], ids=["ngram", "profile"])
def test_a_mode_name_alone_drafts(bf16_engine, default):
    """`skip` and `early_exit` by name work whatever the default names: the layers they
    need come from the untuned defaults where the default has none, and output is `off`'s."""
    eng = bf16_engine
    saved = eng.default_draft
    if default is not None:
        eng.default_draft = default
    try:
        want = eng.generate(PROMPTS[:2], PARAMS, "off")
        for mode in ("skip", "early_exit"):
            cfg = eng.draft_config(mode)
            assert cfg.mode == mode and cfg.layer_mode == mode
            got = eng.generate(PROMPTS[:2], PARAMS, mode)
            assert [o.token_ids for o in got] == [o.token_ids for o in want], mode
            assert sum(o.stats["drafted_tokens"] for o in got) > 0, mode
        exit_layer = eng.default_draft.exit_layer or eng.model.num_layers * 3 // 4
        assert eng.draft_config("early_exit").exit_layer == exit_layer
    finally:
        eng.default_draft = saved
    assert_no_blocks_held(eng)
