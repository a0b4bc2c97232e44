"""Stops live: EOS, stop ids and stop strings end output the same way in every drafting
mode, at batch 1 and 8, streamed or not, and a session continues after a stopped turn."""

from __future__ import annotations

import random

import pytest
from engine_helpers import Case, assert_no_blocks_held, run_together, stream_together

from services.engine import DraftConfig, Engine, SamplingParams
from services.engine.detokenizer import decode

PROMPTS = [
    "Say OK.",
    "Count from 1 to 20, separated by commas.",
    "What is the capital of France?",
    "List three uses of copper.",
    "hi",
    "Write a haiku about the sea.",
    "Name two planets.",
    "Spell the word cat backwards.",
]
MODES = [
    "off",
    DraftConfig(mode="skip", skip_attn=(1, 14), skip_mlp=(15,), max_draft=4),
    DraftConfig(mode="early_exit", exit_layer=15, max_draft=4),
    DraftConfig(mode="ngram", max_draft=4),
    DraftConfig(mode="auto", skip_attn=(1,), skip_mlp=(14,), max_draft=4),
]
TOKENS = 16


@pytest.fixture(scope="module")
def engine(bf16_engine) -> Engine:
    """The engine as served (bfloat16: the `cpu` backend on x86 CPUs)."""
    return bf16_engine


@pytest.fixture(scope="module")
def reference(engine) -> list[list[int]]:
    """Each prompt's greedy output with no stop at all, drafting off."""
    params = SamplingParams(max_tokens=TOKENS, ignore_eos=True)
    return [s.output for s in run_together(engine, [Case(p, params, "off") for p in PROMPTS])]


def stop_ids(reference: list[list[int]]) -> tuple[int, ...]:
    """A token from the middle of each answer: most stop a few tokens in, inside drafts."""
    return tuple(sorted({out[len(out) // 3] for out in reference}))


@pytest.fixture(scope="module")
def stopped(engine, reference) -> list[list[int]]:
    """Each prompt's output with stop ids and EOS live, drafting off: the reference cut
    after its first stop."""
    params = SamplingParams(max_tokens=TOKENS, stop_token_ids=stop_ids(reference))
    out = [s.output for s in run_together(engine, [Case(p, params, "off") for p in PROMPTS])]
    for ref, got in zip(reference, out, strict=True):
        ends = [i for i, t in enumerate(ref) if t in params.stop_token_ids or t in engine.eos_ids]
        assert got == ref[: ends[0] + 1] if ends else got == ref
    return out


@pytest.mark.parametrize("mode", MODES[1:], ids=lambda m: m.mode)
def test_stop_ids_and_eos_live_match_off(engine, reference, stopped, mode):
    params = SamplingParams(max_tokens=TOKENS, stop_token_ids=stop_ids(reference))
    expected = stopped
    alone = [run_together(engine, [Case(p, params, mode)])[0].output for p in PROMPTS[:3]]
    together = run_together(engine, [Case(p, params, mode) for p in PROMPTS])
    assert alone == expected[:3]
    assert [s.output for s in together] == expected
    if mode.mode != "auto":  # auto may rightly choose not to draft
        assert sum(s.stats.accepted for s in together) > 0
    assert_no_blocks_held(engine)


@pytest.mark.parametrize("mode", MODES[1:], ids=lambda m: m.mode)
def test_a_session_continues_after_a_turn_stopped_inside_a_draft(engine, reference, mode):
    """The stop token accepted inside a draft leaves no KV beyond the tokens kept: the next
    turn of the session reuses the cache and equals a fresh run."""
    params = SamplingParams(max_tokens=TOKENS, stop_token_ids=stop_ids(reference))
    first = [engine.encode(p, chat=True) for p in PROMPTS]
    turn1 = run_together(
        engine, [Case(f, params, mode, session_id=f"stop-{i}") for i, f in enumerate(first)]
    )
    assert any(s.finish_reason == "stop" and s.output[-1] in params.stop_token_ids for s in turn1)
    for s in turn1:
        assert s.table.num_tokens == s.num_tokens - 1  # KV for every token kept but the last
    follow = [
        f + s.output + engine.encode("Thanks. And then?") for f, s in zip(first, turn1, strict=True)
    ]
    cached = run_together(
        engine, [Case(f, params, mode, session_id=f"stop-{i}") for i, f in enumerate(follow)]
    )
    fresh = run_together(engine, [Case(f, params, "off") for f in follow])
    assert [s.output for s in cached] == [s.output for s in fresh]
    assert all(s.stats.cached_prompt_tokens >= len(f) for s, f in zip(cached, first, strict=True))
    assert_no_blocks_held(engine)


def stop_cases(engine, reference: list[list[int]], seed: int) -> list[tuple[str, str]]:
    """(prompt, stop string) pairs: strings cut from the reference text at random places,
    most of them spanning a token boundary."""
    rng = random.Random(seed)
    cases = []
    for prompt, out in zip(PROMPTS, reference, strict=True):
        text = decode(engine.tokenizer, out)
        if len(text) < 4:
            continue
        start = rng.randrange(1, len(text) - 2)
        cases.append((prompt, text[start : start + rng.randint(1, 6)]))
    return cases


@pytest.mark.parametrize("mode", MODES, ids=lambda m: getattr(m, "mode", m))
def test_stop_strings_streamed_unary_and_reference_agree(engine, reference, mode):
    """Property: for random stop strings, the streamed text (joined deltas), the unary text
    and the reference text cut before the stop's first occurrence are one and the same."""
    by_prompt = dict(zip(PROMPTS, reference, strict=True))
    cases = stop_cases(engine, reference, seed=len(str(mode)))
    runs = [
        Case(p, SamplingParams(max_tokens=TOKENS, ignore_eos=True, stop=(s,)), mode)
        for p, s in cases
    ]
    unary = run_together(engine, runs)
    streamed = stream_together(engine, runs)
    for (prompt, stop), seq, (text, ids, reason) in zip(cases, unary, streamed, strict=True):
        full = decode(engine.tokenizer, by_prompt[prompt])
        want = full[: full.index(stop)]
        assert seq.text.text == want and text == want, (stop, mode)
        assert seq.finish_reason == reason == "stop"
        assert ids == seq.output  # the tokens up to the one completing the stop
        assert want == decode(engine.tokenizer, ids)[: len(want)]
    assert_no_blocks_held(engine)
