"""`benchmarks.draft_frontier`: the speedups replayed over recorded agreements are the
speculative-decoding arithmetic, foresight never loses to a fixed draft length, and a
run on a tiny model reports every candidate with its costs from the model's own sizes.

    pytest tests/engine/test_draft_frontier.py
"""

from __future__ import annotations

import json
import random

import pytest

from benchmarks import draft_frontier
from benchmarks.draft_frontier import oracle, replay
from services.engine import Engine
from services.engine.drafting.forced import sublayer_sizes

VERIFY = [1.0, 1.1, 1.2, 1.3, 1.4, 1.5, 1.6, 1.7, 1.8]


def test_replay_counts_the_accepted_run_and_the_full_models_token():
    # Drafting 2 from position 0: both accepted, plus the model's token -> 3 tokens. From
    # 3: the first draft refused -> 1 token. From 4: one accepted -> 2 tokens (the end).
    hits = [[True, True, True, False, True, False]]
    rounds = 3
    cost = rounds * (3 * 0.2 + 2 * 0.1 + 0.8 * VERIFY[2])
    assert replay(hits, 0.2, 0.1, VERIFY, 2) == pytest.approx(6 / cost)


def test_a_draft_that_never_agrees_costs_its_steps_and_foresight_never_drafts():
    hits = [[False] * 20]
    assert replay(hits, 0.0, 0.5, VERIFY, 1) == pytest.approx(1 / (0.5 + 1.1))
    assert oracle(hits, 0.0, 0.5, VERIFY) == pytest.approx(1.0)  # plain decoding


def test_a_free_draft_that_always_agrees_gains_its_length_over_verification():
    hits = [[True] * 90]  # rounds of 9 tokens for one 9-token pass
    assert oracle(hits, 0.0, 0.0, VERIFY) == pytest.approx(9 / 1.8)
    assert replay(hits, 0.0, 0.0, VERIFY, 8) == pytest.approx(9 / 1.8)


def test_foresight_never_loses_to_a_fixed_length():
    rng = random.Random(0)
    for _ in range(50):
        hits = [[rng.random() < rng.random() for _ in range(rng.randrange(1, 60))]]
        shared, step = rng.random() * 0.5, rng.random() * 0.5
        fixed = max(replay(hits, shared, step, VERIFY, k) for k in range(1, 9))
        assert oracle(hits, shared, step, VERIFY) >= fixed - 1e-12


def test_a_tiny_model_is_measured_and_charged_by_its_sizes(tiny_checkpoint, tmp_path):
    path = tiny_checkpoint("llama")  # 4 layers, 512 token ids
    eng = Engine.from_pretrained(str(path), dtype="bfloat16", kv_cache_bytes=8 << 20)
    rng = random.Random(0)
    prompts = [[rng.randrange(1, 512) for _ in range(n)] for n in (12, 30)]
    frontier = draft_frontier.Frontier(eng, prompts, 8)
    argv = ["--exit-layers", "1,3", "--train-layers", "2", "--train-steps", "5"]
    args = draft_frontier.parse_args([*argv, "--skip-sizes", "1,3", "--out", str(tmp_path)])
    text = [[rng.randrange(1, 512) for _ in range(64)] for _ in range(20)]
    found = draft_frontier.candidates(frontier, args, text, lambda message: None)
    rows = [draft_frontier.row(c, frontier.tuner.verify) for c in found]
    report = draft_frontier.write(args, frontier, rows, ["a", "b"], argv)

    assert json.loads((tmp_path / "frontier.json").read_text())["candidates"] == rows
    assert (tmp_path / "frontier.png").stat().st_size > 0
    names = [r["name"] for r in rows]
    assert names[:3] == ["exit 1", "exit 3", "trained exit 2"]
    assert [r["family"] for r in rows[3:]] == ["skip", "skip"] and names[3] != names[4]
    # Every answer position is scored, for every candidate.
    assert all(len(c.hits) == 2 and all(len(h) == 8 for h in c.hits) for c in found)

    sizes = sublayer_sizes(eng)
    layer = sizes["attn"] + sizes["mlp"]
    assert rows[1]["shared"] == pytest.approx(3 * layer, abs=1e-4)
    assert rows[0]["step"] == 0.0 and rows[2]["shared"] == pytest.approx(2 * layer, abs=1e-4)
    for r in rows:
        assert 0.0 <= r["agreement"] <= 1.0
        assert r["oracle"] >= r["speedup"] - 1e-4 and 1 <= r["k"] <= draft_frontier.MAX_K
        # A pass reads no more than the layers: the head is never charged.
        assert 0 < r["shared"] + r["step"] <= 4 * layer + 1e-4
    assert report["best"]["oracle"] == max(r["oracle"] for r in rows)
    assert len(report["verify_cost"]) == 9 and report["verify_cost"][0] == 1.0


def test_layers_and_sizes_outside_the_model_are_refused():
    args = draft_frontier.parse_args(["--exit-layers", "0,8", "--train-layers", "30"])
    assert "between 1 and 29; got [0, 30]" in draft_frontier.bad_args(args, 30)
    args = draft_frontier.parse_args(["--exit-layers", "8", "--skip-sizes", "2,60"])
    assert "between 1 and 59 sublayers; got [60]" in draft_frontier.bad_args(args, 30)
    assert draft_frontier.bad_args(draft_frontier.parse_args([]), 30) is None
