"""Prompt lookup proposes what followed the latest earlier match of the longest suffix."""

from __future__ import annotations

import random

from services.engine import DraftConfig, SamplingParams
from services.engine.drafting.ngram import ngram_proposal
from services.engine.drafting.plan import DraftPlan, Kind


def slow_reference(context: list[int], max_len: int, n_min: int, n_max: int) -> list[int]:
    for n in range(min(n_max, len(context) - 1), n_min - 1, -1):
        suffix = context[len(context) - n :]
        for start in range(len(context) - n - 1, -1, -1):
            if context[start : start + n] == suffix:
                return context[start + n : start + n + max_len]
    return []


def test_examples():
    assert ngram_proposal([1, 2, 3, 4, 1, 2], 3, 1, 4) == [3, 4, 1]
    assert ngram_proposal([9, 1, 2, 3, 9, 1, 2, 3, 9], 2, 1, 4) == [1, 2]
    assert ngram_proposal([5, 6, 7], 2, 1, 4) == []
    assert ngram_proposal([7], 2, 1, 4) == []


def test_matches_a_plain_search_on_random_contexts():
    rng = random.Random(0)
    for _ in range(500):
        context = [rng.randrange(6) for _ in range(rng.randint(1, 60))]
        args = (rng.randint(1, 5), rng.randint(1, 2), rng.randint(2, 5))
        assert ngram_proposal(context, *args) == slow_reference(context, *args)


PROMPT = "Copy this list twice: apple, banana, cherry, date, elderberry, fig, grape, kiwi."


def force_continuation(engine, monkeypatch) -> None:
    """Make `auto` continue every n-gram proposal shorter than the room with the layer
    draft, and draft with the layer draft alone otherwise: the mechanism under test,
    whatever the policy would judge, and decisions that do not depend on timings."""

    def forced(seq, cfg, room, batch):
        proposal = tuple(ngram_proposal(seq.tokens, room, cfg.ngram_min, cfg.ngram_max))
        if 0 < len(proposal) < room:
            return DraftPlan(Kind.NGRAM_LAYER, room, cfg.layer_mode, proposal)
        return DraftPlan(Kind.LAYER, room, cfg.layer_mode) if room else DraftPlan()

    monkeypatch.setattr(engine.drafting.policy, "choose", forced)
    monkeypatch.setattr(engine, "auto_layer_draft", True)


def test_a_continued_ngram_proposal_stays_exact(engine, monkeypatch):
    params = SamplingParams(max_tokens=48, ignore_eos=True)
    # Repeating text with a period shorter than the room: proposals run out early.
    prompts = [
        engine.encode("1, 2, 3, 1, 2, 3, 1, 2, 3, 1, 2, 3,"),
        engine.encode("red green blue, red green blue, red green blue, red green blue,"),
        engine.encode(PROMPT, chat=True),
    ]
    alone = [engine.generate([p], params, "off")[0].token_ids for p in prompts]
    force_continuation(engine, monkeypatch)
    # A draft that agrees almost always (one MLP skipped), and an exit that often does not.
    for cfg, share in (
        (DraftConfig(mode="auto", skip_mlp=(20,), max_draft=8, threshold=0.2), 0.8),
        (DraftConfig(mode="auto", exit_layer=28, max_draft=8), 0.3),
    ):
        before = engine.telemetry.snapshot()
        outs = engine.generate(prompts, params, cfg)
        window = engine.telemetry.snapshot().since(before)
        assert [o.token_ids for o in outs] == alone, cfg
        # Continued drafts ran, and verification kept most of their tokens: the layer
        # draft continued from the proposal's end, not from the last accepted token.
        combined = [k for k in window.decisions if k[0] == f"ngram+{cfg.layer_mode}"]
        assert combined, window.decisions
        drafted = [sum(window.drafted[k]) for k in combined]
        accepted = [sum(window.accepted[k]) for k in combined]
        assert sum(accepted) > share * sum(drafted), (cfg, drafted, accepted)
    assert engine.pool.num_free == engine.pool.num_blocks


def test_a_continued_ngram_proposal_samples_reproducibly(engine, monkeypatch):
    force_continuation(engine, monkeypatch)
    params = SamplingParams(max_tokens=32, temperature=0.8, seed=7, ignore_eos=True)
    cfg = DraftConfig(mode="auto", skip_attn=(3, 9), max_draft=5)
    runs = [engine.generate([PROMPT], params, cfg, chat=True)[0].token_ids for _ in range(2)]
    assert runs[0] == runs[1] and len(runs[0]) == 32
    assert engine.pool.num_free == engine.pool.num_blocks


def test_auto_continues_a_short_proposal_where_that_pays(engine, monkeypatch):
    """The policy's own judgement: a short n-gram proposal that is always accepted, and a
    cheap layer draft right 80% of the time: continuing the proposal beats either alone.
    With the layer draft rarely right, the proposal goes alone."""
    from services.engine.drafting.costs import Costs
    from services.engine.drafting.policy import Acceptance
    from services.engine.kv_pool import BlockTable
    from services.engine.sequence import Sequence

    costs = Costs(decode={1: 0.020}, per_token={1: 0.0002}, draft_pass={("skip", 1): 0.004})
    monkeypatch.setattr(engine.drafting.policy, "costs", costs)
    monkeypatch.setattr(engine, "auto_layer_draft", True)
    tokens = [1, 2, 3, 4, 5, 9, 5]  # the lookup proposes 9, 5: two tokens
    seq = Sequence("policy", tokens, SamplingParams(max_tokens=16), BlockTable(engine.pool))
    policy = engine.drafting.policy
    policy._acceptance[seq] = {
        "ngram": Acceptance((0.0, 0.0), [[10.0, 10.0]] * 8),
        "skip": Acceptance((0.0, 0.0), [[8.0, 10.0]] * 8),
    }
    cfg = DraftConfig(mode="auto", skip_attn=(3,), max_draft=8)
    plan = policy.choose(seq, cfg, 8, 1)
    assert plan.proposal == (9, 5)
    assert plan.name == "ngram+skip" and plan.k > len(plan.proposal)
    policy._acceptance[seq]["skip"] = Acceptance((0.0, 0.0), [[1.0, 10.0]] * 8)
    assert policy.choose(seq, cfg, 8, 1) == DraftPlan(Kind.NGRAM, 2, proposal=(9, 5))
