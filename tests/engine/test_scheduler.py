"""Continuous batching, cancellation, sessions and streaming."""

from __future__ import annotations

import asyncio
import random

import pytest
from waiting import wait_for

from services.engine import DraftConfig, SamplingParams
from services.engine.kv_pool import BlockTable
from services.engine.scheduler import CachedSession, QueueFull

WORDS = [
    "the",
    "cat",
    "sat",
    "on",
    "a",
    "mat",
    "while",
    "seven",
    "blue",
    "birds",
    "sang",
    "about",
    "rivers",
    "and",
    "old",
    "maps",
]


def prompt(i: int) -> str:
    rng = random.Random(i)
    return " ".join(rng.choice(WORDS) for _ in range(3 + 5 * (i % 7)))


def drain(engine) -> None:
    while engine.scheduler.has_work:
        engine.step_once()


def test_requests_arriving_over_time_keep_greedy_exactness(engine):
    """32 requests with different prompts, lengths, drafting and arrival steps each get
    exactly the tokens the request alone with drafting off gets."""
    rng = random.Random(0)
    modes = ["off", "skip", "ngram", DraftConfig(mode="early_exit", exit_layer=20, max_draft=3)]
    reqs = [
        (prompt(i), SamplingParams(max_tokens=rng.randint(4, 14), ignore_eos=True), modes[i % 4])
        for i in range(32)
    ]
    alone = [engine.generate([p], params, "off")[0].token_ids for p, params, _ in reqs]
    arrivals = sorted(rng.sample(range(60), 32))
    seqs, step = [], 0
    while len(seqs) < len(reqs) or engine.scheduler.has_work:
        while len(seqs) < len(reqs) and arrivals[len(seqs)] <= step:
            p, params, mode = reqs[len(seqs)]
            seqs.append(engine.add_request(p, params, mode))
        engine.step_once()
        step += 1
    assert [s.output for s in seqs] == alone
    assert engine.pool.num_free == engine.pool.num_blocks


def test_cancelling_at_every_stage_frees_every_block(engine):
    long_prompt = " ".join(WORDS * 12)
    params = SamplingParams(max_tokens=30, ignore_eos=True)
    chunk, engine.prefill_chunk = engine.prefill_chunk, 16
    try:
        waiting = [engine.add_request(prompt(i), params, "skip") for i in range(3)]
        prefilling = engine.add_request(long_prompt, params, "skip")
        decoding = engine.add_request(prompt(9), params, "skip")
        engine.abort(waiting[0].id)  # before admission
        engine.step_once()
        assert engine.scheduler.prefilling, "the long prompt should be mid-prefill"
        engine.abort(prefilling.id)  # during prefill
        for _ in range(3):
            engine.step_once()
        engine.abort(decoding.id)  # while drafting and verifying
        drain(engine)
    finally:
        engine.prefill_chunk = chunk
    assert waiting[0].finish_reason == "abort" and not waiting[0].output
    assert prefilling.finish_reason == "abort"
    assert decoding.finish_reason == "abort" and 0 < len(decoding.output) < 30
    assert all(s.finish_reason == "length" for s in waiting[1:])
    assert engine.pool.num_free == engine.pool.num_blocks


def test_session_second_turn_reuses_the_cached_prefix(engine):
    params = SamplingParams(max_tokens=12, ignore_eos=True)
    first = engine.encode("Name three rivers in Europe.", chat=True)
    [turn1] = engine.generate([first], params, "off", session_id="s-1")
    follow = first + turn1.token_ids + engine.encode("Which is longest?", chat=False)
    [cached] = engine.generate([follow], params, "skip", session_id="s-1")
    [fresh] = engine.generate([follow], params, "off")
    assert cached.token_ids == fresh.token_ids
    assert cached.stats["cached_prompt_tokens"] >= len(first)
    assert fresh.stats["cached_prompt_tokens"] == 0
    # Retained blocks go back to the pool when live requests need the room.
    assert engine.scheduler.sessions
    engine.scheduler.clear_sessions()
    assert engine.pool.num_free == engine.pool.num_blocks


def test_stop_strings_and_stop_token_ids(engine):
    params = SamplingParams(max_tokens=40, ignore_eos=True)
    [full] = engine.generate(["Count from one to ten in words."], params, "off", chat=True)
    cut = full.text[5:9]
    [stopped] = engine.generate(
        ["Count from one to ten in words."],
        SamplingParams(max_tokens=40, ignore_eos=True, stop=(cut,)),
        "skip",
        chat=True,
    )
    assert stopped.finish_reason == "stop"
    assert stopped.text == full.text[: full.text.index(cut)]
    token = full.token_ids[3]
    [by_id] = engine.generate(
        ["Count from one to ten in words."],
        SamplingParams(max_tokens=40, stop_token_ids=(token,)),
        "ngram",
        chat=True,
    )
    assert by_id.token_ids == full.token_ids[: full.token_ids.index(token) + 1]


def test_queue_limit_and_duplicate_ids(engine):
    params = SamplingParams(max_tokens=2)
    limit, engine.scheduler.max_waiting = engine.scheduler.max_waiting, 2
    try:
        engine.add_request("a", params, request_id="dup")
        with pytest.raises(ValueError, match="already in use"):
            engine.add_request("b", params, request_id="dup")
        engine.add_request("c", params)
        with pytest.raises(QueueFull):
            engine.add_request("d", params)
        with pytest.raises(ValueError, match="session_id"):
            engine.add_request("e", params, session_id="x" * 1000)
        drain(engine)
    finally:
        engine.scheduler.max_waiting = limit
    assert engine.pool.num_free == engine.pool.num_blocks


def test_async_streaming_equals_generate(engine):
    params = SamplingParams(max_tokens=16, ignore_eos=True)
    [ref] = engine.generate(["Describe a sunrise."], params, "skip", chat=True)

    async def run():
        tokens, text, last = [], "", None
        async for delta in engine.submit("Describe a sunrise.", params, "skip", chat=True):
            tokens += delta.token_ids
            text += delta.text
            last = delta
        return tokens, text, last

    try:
        tokens, text, last = asyncio.run(run())
    finally:
        engine.shutdown()
    assert tokens == ref.token_ids and text == ref.text
    assert last.finish_reason == "length" and last.stats["steps"] > 0
    assert_idle(engine)


def assert_idle(engine) -> None:
    wait_for(lambda: not engine.scheduler.has_work, what="the engine to go idle")
    engine.scheduler.clear_sessions()
    assert engine.pool.num_free == engine.pool.num_blocks


def spy_on_finish(engine, monkeypatch) -> dict[str, tuple[str, int]]:
    """How each request ended, as the scheduler saw it: (finish reason, tokens out)."""
    ended, finish = {}, engine.scheduler.finish

    def spy(request, seq):
        ended[request.request_id] = (seq.finish_reason, len(seq.output))
        finish(request, seq)

    monkeypatch.setattr(engine.scheduler, "finish", spy)
    return ended


@pytest.mark.parametrize("abort_works", [True, False], ids=["abort", "control-abort-ignored"])
def test_leaving_a_stream_cancels_it(engine, monkeypatch, abort_works):
    """A client that leaves after the first delta ends its request as `abort`, long before
    its 200 tokens; the control, with abort ignored, shows the check would catch that."""
    ended = spy_on_finish(engine, monkeypatch)
    if not abort_works:
        monkeypatch.setattr(engine, "abort", lambda request_id: False)
    params = SamplingParams(max_tokens=200, ignore_eos=True)

    async def leave_early():
        stream = engine.submit("Describe a sunset.", params, chat=True, request_id="leave")
        async for _ in stream:
            break
        await stream.aclose()

    asyncio.run(leave_early())
    wait_for(lambda: "leave" in ended, what="the request to end")
    reason, tokens = ended["leave"]
    assert (reason == "abort" and tokens < params.max_tokens) is abort_works
    assert_idle(engine)


@pytest.mark.parametrize("evicts", [True, False], ids=["lru", "control-never-evicts"])
def test_sessions_are_evicted_least_recently_used_first(engine, monkeypatch, evicts):
    """With one block free, a new request takes the oldest session's blocks and leaves the
    newer one cached; the control, with eviction disabled, is never admitted."""
    params = SamplingParams(max_tokens=4, ignore_eos=True)
    engine.scheduler.clear_sessions()
    for session in ("older", "newer"):
        engine.generate(["hi"], params, "off", chat=True, session_id=session)
    ballast = BlockTable(engine.pool)  # everything free but one block
    ballast.reserve((engine.pool.num_free - 1) * engine.pool.block_size)
    if not evicts:
        pool = engine.pool
        monkeypatch.setattr(engine.scheduler, "_evict", lambda blocks: pool.num_free >= blocks)
    seq = engine.add_request("hi", params, "off", chat=True)
    for _ in range(50):  # a prefill and four decode steps, were it admitted
        if seq.finished:
            break
        engine.step_once()
    try:
        assert (seq.finish_reason == "length") is evicts
        assert list(engine.scheduler.sessions) == (["newer"] if evicts else ["older", "newer"])
    finally:
        engine.abort(seq.id)
        engine.step_once()
        ballast.free()
    assert_idle(engine)


@pytest.mark.parametrize("drops", [True, False], ids=["dropped", "control-kept"])
def test_a_failed_step_keeps_no_session(engine, monkeypatch, drops):
    """A step that fails outside any one request fails every request in it (`_fail_all`),
    and a failed request's session is not cached: its KV may be half written. The
    control keeps every session, as a broken `finish` would, and is caught."""

    def failing_decode():
        raise RuntimeError("a step failed on purpose")

    monkeypatch.setattr(engine, "_decode", failing_decode)
    if not drops:
        sch = engine.scheduler
        monkeypatch.setattr(
            sch,
            "finish",
            lambda request, seq: sch._put_session(
                request.session_id, CachedSession(seq.tokens, seq.table)
            ),
        )
    params = SamplingParams(max_tokens=8, ignore_eos=True)

    async def run():
        return [d async for d in engine.submit("hi", params, chat=True, session_id="failing")]

    try:
        deltas = asyncio.run(run())
    finally:
        engine.shutdown()
    assert deltas[-1].finish_reason == "error"
    assert ("failing" not in engine.scheduler.sessions) is drops
    assert_idle(engine)
