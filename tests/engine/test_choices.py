"""`n` choices per request: one prefill, the prompt's KV blocks shared, every choice its
own sample, and every block back in the pool however the choices end."""

from __future__ import annotations

import asyncio

import pytest
from engine_helpers import assert_no_blocks_held

from services.engine import Engine, SamplingParams

PROMPT = "Write a short poem about a cat who lives in a lighthouse by the sea."
SAMPLED = SamplingParams(n=3, temperature=1.0, max_tokens=6, ignore_eos=True)
# Several blocks of 16 tokens, the last partly filled.
LONG_PROMPT = list(range(1000, 1075))


def step_until_done(eng: Engine, seqs) -> None:
    while not all(s.finished for s in seqs):
        eng.step_once()


def test_sampled_choices_have_their_indexes_and_differ(engine):
    out = engine.generate(PROMPT, SamplingParams(n=3, temperature=1.0, max_tokens=8))
    assert [c.index for c in out] == [0, 1, 2]
    assert len({tuple(c.token_ids) for c in out}) > 1
    assert_no_blocks_held(engine)


def test_generate_is_prompt_major_then_choice_order(engine):
    out = engine.generate(["hi", "Say OK."], SAMPLED, chat=True)
    assert [c.index for c in out] == [0, 1, 2, 0, 1, 2]
    assert all(len(c.token_ids) == SAMPLED.max_tokens for c in out)
    assert_no_blocks_held(engine)


def test_a_seeded_request_repeats_and_choice_i_samples_from_seed_plus_i(engine):
    params = SamplingParams(n=3, temperature=1.0, max_tokens=8, seed=7, ignore_eos=True)
    first = [c.token_ids for c in engine.generate(PROMPT, params, "off")]
    assert [c.token_ids for c in engine.generate(PROMPT, params, "off")] == first
    assert len({tuple(t) for t in first}) > 1
    # A forked choice continues from the first's KV exactly as its own prefill would.
    for i, tokens in enumerate(first):
        alone = SamplingParams(temperature=1.0, max_tokens=8, seed=7 + i, ignore_eos=True)
        assert engine.generate(PROMPT, alone, "off")[0].token_ids == tokens
    assert_no_blocks_held(engine)


def test_choices_share_the_prompts_full_blocks(engine):
    pool = engine.pool
    params = SamplingParams(n=3, temperature=1.0, max_tokens=4, ignore_eos=True)
    first = engine.add_request(LONG_PROMPT, params, "off")
    engine.step_once()  # prefill, fork, and a first decode step
    running = [s for _, s in engine.scheduler.running]
    assert sorted(s.index for s in running) == [0, 1, 2]
    assert {s.id for s in running} == {first.id, f"{first.id}/1", f"{first.id}/2"}
    full = len(LONG_PROMPT) // pool.block_size
    for s in running:
        assert [pool.refs(b) for b in s.table.blocks[:full]] == [3] * full
        assert s.table.blocks[:full] == first.table.blocks[:full]
        assert all(pool.refs(b) == 1 for b in s.table.blocks[full:])
    used = pool.num_blocks - pool.num_free
    alone = sum(len(s.table.blocks) for s in running)
    assert used == alone - 2 * full  # the full prompt blocks are held once
    step_until_done(engine, running)
    assert all(s.finish_reason == "length" for s in running)
    assert_no_blocks_held(engine)


@pytest.mark.parametrize("when", ["before the fork", "after the fork"])
def test_aborting_the_request_aborts_every_choice(engine, when):
    seqs = engine.add_choices(LONG_PROMPT, SAMPLED, "off", request_id="many")
    if when == "after the fork":
        engine.step_once()
        assert len(engine.scheduler.running) == 3
    assert engine.abort("many")
    while engine.scheduler.has_work:
        engine.step_once()
    assert [s.finish_reason for s in seqs] == ["abort"] * 3
    assert engine.scheduler.unforked == {}
    assert not engine.abort("many")
    assert_no_blocks_held(engine)


def test_choices_of_a_request_that_fails_before_the_fork_fail_with_it(engine, monkeypatch):
    ended = []

    def broken(*args, **kwargs):
        raise RuntimeError("prefill broke")

    monkeypatch.setattr(engine.runner, "prefill", broken)
    engine.add_request(PROMPT, SAMPLED, on_update=lambda s, done: done and ended.append(s))
    while engine.scheduler.has_work:
        engine.step_once()
    assert sorted(s.index for s in ended) == [0, 1, 2]
    assert {(s.finish_reason, s.error) for s in ended} == {("error", "RuntimeError: prefill broke")}
    assert_no_blocks_held(engine)


def test_greedy_choices_are_refused():
    with pytest.raises(ValueError, match=r"^n > 1 needs temperature > 0"):
        SamplingParams(n=2)


def test_one_token_choices_all_finish_at_the_fork(engine):
    seqs = engine.add_choices(
        PROMPT, SamplingParams(n=2, temperature=1.0, max_tokens=1, ignore_eos=True)
    )
    engine.step_once()
    assert [(s.finish_reason, len(s.output)) for s in seqs] == [("length", 1)] * 2
    assert_no_blocks_held(engine)


@pytest.mark.parametrize("draft", ["ngram", "skip"])
def test_choices_draft(engine, draft):
    params = SamplingParams(n=2, temperature=0.5, max_tokens=16, seed=3, ignore_eos=True)
    prompt = "Repeat after me: one two three four, one two three four, one two three four."
    out = engine.generate(prompt, params, draft, chat=True)
    assert [c.index for c in out] == [0, 1]
    assert all(len(c.token_ids) == 16 for c in out)
    assert all(c.stats["drafted_tokens"] > 0 for c in out)
    assert_no_blocks_held(engine)


@pytest.fixture(scope="module")
def small(engine) -> Engine:
    """The default model with a pool of 12 blocks: three choices of LONG_PROMPT outgrow it."""
    kv = engine.pool.kv[0]
    per_block = kv[:16].numel() * kv.element_size() * engine.model.num_layers
    return Engine.from_pretrained("default", dtype="float32", kv_cache_bytes=12 * per_block)


def test_preempted_choices_complete_as_without_preemption(engine, small):
    params = SamplingParams(n=3, temperature=1.0, max_tokens=24, seed=11, ignore_eos=True)
    assert small.pool.num_blocks == 12
    seqs = small.add_choices(LONG_PROMPT, params, "off")
    step_until_done(small, seqs)
    assert sum(s.stats.preemptions for s in seqs) > 0
    assert all(s.finish_reason == "length" for s in seqs)
    roomy = [c.token_ids for c in engine.generate([LONG_PROMPT], params, "off")]
    assert [s.output for s in seqs] == roomy
    assert_no_blocks_held(small)


def test_a_stream_interleaves_choices_and_leaving_it_aborts_them(engine):
    params = SamplingParams(n=3, temperature=1.0, max_tokens=5, ignore_eos=True)

    async def whole():
        return [d async for d in engine.submit(PROMPT, params)]

    async def leave():
        async for delta in engine.submit(PROMPT, params, request_id="left"):
            return delta

    try:
        deltas = asyncio.run(whole())
        for i in range(3):
            mine = [d for d in deltas if d.index == i]
            assert sum(len(d.token_ids) for d in mine) == 5
            assert [d.finish_reason for d in mine][-1] == "length"
        aborted = engine.finished["abort"]
        assert asyncio.run(leave()).index in (0, 1, 2)
        while engine.scheduler.has_work:
            asyncio.run(asyncio.sleep(0.05))
        assert engine.finished["abort"] > aborted
        assert not engine.abort("left")
    finally:
        engine.shutdown()
    assert_no_blocks_held(engine)


def test_only_the_first_choice_keeps_the_session(engine):
    params = SamplingParams(n=3, temperature=1.0, max_tokens=4, ignore_eos=True)
    first = engine.generate([LONG_PROMPT], params, "off", session_id="choices")[0]
    assert engine.scheduler.sessions["choices"].tokens == LONG_PROMPT + first.token_ids
    stats = engine.stats()
    assert stats["kv_blocks_in_use"] == 0 and stats["kv_blocks_free"] < stats["kv_blocks_total"]
    again = SamplingParams(max_tokens=2)
    (second,) = engine.generate([LONG_PROMPT + [7, 8]], again, "off", session_id="choices")
    assert second.stats["cached_prompt_tokens"] == len(LONG_PROMPT)
    assert_no_blocks_held(engine)
