"""One request's failure ends that request alone: the others of its batch go on, exactly."""

from __future__ import annotations

import pytest
from engine_helpers import EIGHT_CHATS as PROMPTS
from engine_helpers import Case, assert_no_blocks_held, run_together

from services.engine import Engine, SamplingParams, faults

VICTIM = 3  # the request a fault is injected into


def cases() -> list[Case]:
    greedy = SamplingParams(max_tokens=8, ignore_eos=True)
    sampled = SamplingParams(max_tokens=8, ignore_eos=True, temperature=0.8, seed=7)
    return [
        Case(p, sampled if i == 5 else greedy, "skip", request_id=f"iso-{i}")
        for i, p in enumerate(PROMPTS)
    ]


@pytest.fixture(scope="module")
def engine(bf16_engine) -> Engine:
    """The engine as served (bfloat16: the `cpu` backend on x86 CPUs)."""
    return bf16_engine


@pytest.fixture(scope="module")
def clean(engine):
    seqs = run_together(engine, cases())
    assert all(s.finish_reason == "length" for s in seqs)
    return [s.output for s in seqs]


@pytest.mark.parametrize("stage", faults.STAGES)
def test_a_fault_fails_its_request_alone(engine, clean, stage):
    """A fault in admission, prefill, verification or sampling of 1 request out of 8: the
    other 7 (one of them sampling, seeded) get exactly their clean output, the faulty one
    ends with an error at its first step, and every block is free afterwards."""
    faults.inject(stage, f"iso-{VICTIM}")
    try:
        seqs = run_together(engine, cases())
    finally:
        faults.clear()
    victim = seqs[VICTIM]
    assert victim.finish_reason == "error" and f"{stage} failed on purpose" in victim.error
    # It failed at its first step: the others had not finished by then.
    assert len(victim.output) <= 1
    others = [s.output for i, s in enumerate(seqs) if i != VICTIM]
    assert others == [o for i, o in enumerate(clean) if i != VICTIM]
    assert engine.consecutive_failures == 0  # the completions after it say the engine works
    assert_no_blocks_held(engine)


def test_failures_in_a_row_count_until_a_request_completes(engine):
    params = SamplingParams(max_tokens=3, ignore_eos=True)
    faults.inject("verify", "bad-1")
    faults.inject("sample", "bad-2")
    try:
        before = engine.consecutive_failures
        run_together(engine, [Case("hi", params, "skip", request_id="bad-1")])
        run_together(engine, [Case("hi", params, "ngram", request_id="bad-2")])
        assert engine.consecutive_failures == before + 2
    finally:
        faults.clear()
    run_together(engine, [Case("hi", params, "skip")])
    assert engine.consecutive_failures == 0
    assert_no_blocks_held(engine)
