"""The engine's telemetry adds up to what its completions report, and its counts of
layer-draft tokens by confidence say which tokens verification accepted."""

from __future__ import annotations

from services.engine import DraftConfig, SamplingParams
from services.engine.drafting.telemetry import confidence_bin

PROMPTS = [
    "Write a haiku about the sea.",
    "List three prime numbers and explain why they are prime.",
    "What is the capital of France? Answer in one sentence.",
]


def run(engine, draft: DraftConfig):
    before = engine.telemetry.snapshot()
    ids = [engine.encode(p, chat=True) for p in PROMPTS]
    outs = engine.generate(ids, SamplingParams(max_tokens=24, ignore_eos=True), draft=draft)
    return outs, engine.telemetry.snapshot().since(before)


def test_counts_per_position_add_up_to_the_completions(engine):
    """Checked against the tokens themselves: each verification emits its accepted draft
    tokens plus one of its own, after the prefill's first token. Per position, a token is
    accepted only if it was drafted, and only after the one before it was."""
    outs, window = run(engine, DraftConfig(mode="skip", skip_attn=(3, 9, 17), max_draft=4))
    accepted = sum(sum(v) for v in window.accepted.values())
    steps = sum(window.decisions.values())
    assert sum(len(o.token_ids) for o in outs) == len(outs) + steps + accepted
    assert sum(sum(v) for v in window.drafted.values()) > accepted > 0
    for key, drafted_at in window.drafted.items():
        accepted_at = window.accepted.get(key, [])  # as long as the longest accepted run
        accepted_at = accepted_at + [0] * (len(drafted_at) - len(accepted_at))
        assert all(a <= d for a, d in zip(accepted_at, drafted_at, strict=True))
        assert accepted_at == sorted(accepted_at, reverse=True)


def test_confidence_bins_tell_accepted_rejected_and_dropped_tokens(engine):
    threshold = 0.5
    draft = DraftConfig(mode="skip", skip_attn=(3, 9, 17), max_draft=4, threshold=threshold)
    outs, window = run(engine, draft)
    tokens, agreed = window.confidence["skip"]
    assert all(0 <= a <= t for t, a in zip(tokens, agreed, strict=True))
    edge = confidence_bin(threshold)
    accepted = sum(o.stats["accepted_tokens"] for o in outs)
    # At or above the threshold: the drafted tokens whose fate was told. Every accepted
    # token agreed; each other told token is a step's first rejection.
    assert sum(agreed[edge:]) == accepted > 0
    rejections = sum(tokens[edge:]) - accepted
    assert 0 < rejections <= sum(o.stats["steps"] for o in outs)
    # Under it: tokens the draft dropped after an all-accepted draft, judged against the
    # full model's next token; the default model is confident often, but not always.
    assert sum(tokens[:edge]) > 0


def test_one_stall_does_not_make_drafting_look_dear_for_good():
    from services.engine.drafting.costs import Costs

    costs = Costs()
    for _ in range(10):
        costs.observe_verify(1, 1, 0.020)  # plain steps: 20 ms
        costs.observe_verify(1, 3, 0.024)  # two extra tokens: 2 ms each
    assert abs(costs.per_token[1] - 0.002) < 1e-4
    costs.observe_verify(1, 3, 0.200)  # one stall of 180 ms
    assert costs.per_token[1] < 0.004
    _, token_cost = costs.relative("ngram", 1, 0.0)
    assert token_cost < 0.2  # still cheap enough to draft, and so to measure again
    for _ in range(30):  # a lasting change comes through
        costs.observe_verify(1, 3, 0.060)
    assert costs.per_token[1] > 0.015


def test_verify_cost_is_measured_per_draft_length():
    """Verifying 1 extra token is nearly free but more are not (the products turn
    compute-bound): the policy sees each length's own cost, not the average's line."""
    from services.common.speedup import best_length
    from services.engine.drafting.costs import Costs

    costs = Costs()
    for _ in range(10):
        costs.observe_verify(1, 1, 0.010)  # plain steps: 10 ms
        for k, extra_ms in ((1, 0.5), (2, 5.0), (3, 7.0), (4, 9.0)):
            costs.observe_verify(1, 1 + k, 0.010 + extra_ms / 1e3)
    extra = costs.extra_costs(1, 6)
    assert [round(e, 2) for e in extra[:4]] == [0.05, 0.5, 0.7, 0.9]
    assert extra[5] >= extra[4] >= extra[3]  # unmeasured: never below a shorter draft
    rates = [0.7] * 4
    # The line through the average per-token cost makes long drafts look best; the
    # measured costs say 1 is (1.7 tokens for 1.05 steps).
    _, straight = best_length(rates, 0.0, costs.relative("ngram", 1, 0.0)[1])
    gain, k = best_length(rates, 0.0, extra)
    assert straight > 1 and k == 1 and abs(gain - 1.7 / 1.05) < 0.01
    # A batch of 2 whose sequences drafted different lengths counts only in the average.
    costs.observe_verify(2, 2, 0.012)
    costs.observe_verify(2, 5, 0.020)
    assert (2, 1) not in costs.verify_extra and 2 in costs.per_token


def test_a_smaller_batch_in_the_bucket_is_set_against_its_own_size():
    """Bucket 16 holds batches of 9 to 16. Plain passes of 16 cost 48 ms; a batch of 12
    that verifies 3 extra tokens in 45 ms spent about 3 ms a token over a plain pass of
    12 (36 ms), not nothing."""
    from services.engine.drafting.costs import Costs

    costs = Costs()
    for _ in range(10):
        costs.observe_verify(16, 16, 0.048)
        costs.observe_verify(12, 15, 0.045)
    assert abs(costs.per_token[16] - 0.003) < 2e-4


def test_acceptance_is_per_position_given_the_tokens_before():
    """The speedup model multiplies the rates, so each must be conditional on the tokens
    before it: all-or-nothing drafts (n-gram copies) accepted half the time give rates
    1/2, 1, 1, 1, in the engine's policy and in the controller's evidence alike; counted
    over every draft that reached a position they would read 1/2 throughout, and the
    model would expect 1.94 tokens from a 4-token draft instead of 3."""
    from services.common.speedup import speedups
    from services.controller.evidence import ModeStats
    from services.engine.drafting.policy import Acceptance

    acc = Acceptance(prior=(0.0, 1e-9))
    stats = ModeStats()
    for accepted in [4, 0] * 50:
        acc.update(4, accepted)
        stats.add(1, [1, 1, 1, 1], [1] * accepted + [0] * (4 - accepted))
    rates = [acc.rate(i) for i in range(4)]
    assert [round(r, 2) for r in rates] == [0.47, 1.0, 1.0, 1.0]  # recent drafts weigh more
    assert stats.rates() == [0.5, 1.0, 1.0, 1.0]
    tokens = speedups(stats.rates(), 0.0, 0.0)[-1]  # no costs: the tokens a verification yields
    assert tokens == 3.0
    acc = Acceptance(prior=(0.0, 1e-9))
    acc.update(4, 1)  # the first accepted, the second rejected: the last two untold
    assert [c[1] for c in acc.counts] == [1.0, 1.0]


def test_a_new_sequence_starts_from_the_engines_pooled_acceptance():
    """What drafts in a mode have been doing across sequences is a new sequence's prior,
    in place of the fixed one: a mode that keeps failing is not tried afresh at the prior's
    optimism in every request, and one that keeps paying is drafted long from the start."""
    import torch

    from services.engine import SamplingParams
    from services.engine.drafting.policy import PRIOR_ACCEPT, AutoPolicy
    from services.engine.kv_pool import BlockTable, KVPool
    from services.engine.sequence import Sequence

    pool = KVPool(num_layers=1, kv_dim=8, num_blocks=4, block_size=16, dtype=torch.float32)

    def seq(name: str) -> Sequence:
        return Sequence(name, [1, 2, 3], SamplingParams(max_tokens=8), BlockTable(pool))

    policy = AutoPolicy()
    fixed = PRIOR_ACCEPT["ngram"][0] / PRIOR_ACCEPT["ngram"][1]
    first = seq("a")
    assert policy.acceptance(first, "ngram").rate(0) == fixed
    for _ in range(40):  # every n-gram draft of the first sequence rejected
        policy._update(first, "ngram", 4, 0)
    later = policy.acceptance(seq("b"), "ngram")
    assert later.rate(0) < 0.1 < fixed
    for _ in range(40):  # then all accepted, in another sequence
        policy._update(seq("c"), "ngram", 4, 4)
    assert policy.acceptance(seq("d"), "ngram").rate(0) > 0.5
    assert later.rate(0) > 0.5  # its own counts are none yet: the pool speaks for it
