"""`auto` weighs a draft model like any other drafter: by its measured cost and each
sequence's acceptance, choosing it only where it pays, and never without one."""

from __future__ import annotations

import torch
from engine_helpers import EIGHT_CHATS
from test_draft_model import assert_pools_free, first_layers, first_layers_path, paired  # noqa: F401

from services.engine import DraftConfig, SamplingParams
from services.engine.drafting.costs import Costs
from services.engine.drafting.plan import Kind
from services.engine.drafting.policy import Acceptance, AutoPolicy
from services.engine.kv_pool import BlockTable, KVPool
from services.engine.sequence import Sequence

AUTO = DraftConfig(mode="auto", max_draft=6)  # no skip set: no layer draft to weigh


def policy_with(cost: float | None, accepted: float) -> tuple[AutoPolicy, Sequence]:
    """A policy whose draft model's pass costs `cost` of a plain step (None: no draft
    model), and a sequence (with no n-gram match) whose drafts it accepted at `accepted`."""
    policy = AutoPolicy()
    policy.model_cost = cost
    policy.costs = Costs(decode={1: 0.020}, per_token={1: 0.0002})
    pool = KVPool(num_blocks=4, block_size=16, num_layers=1, kv_dim=8, dtype=torch.float32)
    seq = Sequence("s", [1, 2, 3, 4], SamplingParams(max_tokens=32), BlockTable(pool))
    policy._acceptance[seq] = {"model": Acceptance((0.0, 0.0), [[10 * accepted, 10.0]] * 8)}
    return policy, seq


def test_auto_chooses_the_draft_model_where_it_pays():
    policy, seq = policy_with(0.2, 0.8)
    plan = policy.choose(seq, AUTO, 6, 1)
    assert plan.kind is Kind.MODEL and plan.k > 1


def test_auto_leaves_a_draft_model_that_does_not_pay():
    policy, seq = policy_with(0.2, 0.1)
    assert policy.choose(seq, AUTO, 6, 1).kind is Kind.OFF
    policy, seq = policy_with(0.9, 0.5)  # right half the time, but nearly a full pass
    assert policy.choose(seq, AUTO, 6, 1).kind is Kind.OFF


def test_auto_without_a_draft_model_never_chooses_one():
    policy, seq = policy_with(None, 1.0)
    assert policy.choose(seq, AUTO, 6, 1).kind is Kind.OFF


def test_auto_drafts_with_the_model_and_measures_it(paired, monkeypatch):  # noqa: F811
    """On the real pair, greedy `auto` output is drafting off's; with a prior cost low
    enough to try the draft model, it drafts with it, times its passes and then weighs
    the measured cost, not the prior."""
    params = SamplingParams(max_tokens=24)
    policy = paired.drafting.policy
    assert 0 < policy.model_cost < 0.5  # 6 of 30 layers and the LM head
    monkeypatch.setattr(policy, "model_cost", 0.01)
    for prompt in EIGHT_CHATS[:2]:
        [base] = paired.generate([prompt], params, "off", chat=True)
        [out] = paired.generate([prompt], params, AUTO, chat=True)
        assert out.token_ids == base.token_ids
    assert policy.telemetry.decisions.get(("model", 1), 0) > 0
    measured, _ = policy.costs.relative("model", 1, policy.model_cost)
    assert measured > 0.05  # a pass of 6 layers and the LM head costs more than 1%
    assert_pools_free(paired)
