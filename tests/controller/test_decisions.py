"""The leader reads replica telemetry from the stream and publishes a decision: drafting
where the speedup model says it pays, off where it does not, per batch bucket."""

from __future__ import annotations

import json
import time

from controller_helpers import add_replica
from waiting import wait_for

from services.common import redis_schema as rs
from services.controller.controller import Controller, Settings
from services.controller.decide import forced_speedup
from services.controller.evidence import wilson
from services.controller.search import Search, neighbours

MODEL = "m"


def window(
    replica: str,
    bucket: int,
    drafted: list[int],
    accepted: list[int],
    costs: dict,
    mode: str = "skip",
):
    """A telemetry window as a FleetLink sends it: `mode`'s drafts at one batch bucket."""
    return {
        "model": MODEL,
        "replica": replica,
        "version": 0,
        "t0": time.time() - 1,
        "t1": time.time(),
        "modes": {
            f"{mode}/{bucket}": {"steps": drafted[0], "drafted": drafted, "accepted": accepted}
        },
        "costs": costs,
        "scores": {},
    }


def send(client, w: dict) -> None:
    client.xadd(
        rs.TELEMETRY, {"model": w["model"], "replica": w["replica"], "window": json.dumps(w)}
    )


def test_controller_decides_from_telemetry(redis_server):
    client = redis_server.client()
    add_replica(client, MODEL, "r1")
    costs = {
        # Batch 1: a draft pass costs 0.3 of a step and extra tokens are nearly free.
        # Batch 16: verification of extra tokens costs as much as a step: no draft pays.
        "decode": {"1": 0.010, "16": 0.020},
        "per_token": {"1": 0.0002, "16": 0.0015},
        "draft_pass": {"skip/1": 0.003, "skip/16": 0.012},
    }
    # Skip-draft tokens by confidence bin: under 0.5 they are accepted too rarely to pay.
    confidence = {"skip": [[0, 0] + [100] * 8, [0, 0, 10, 20, 30, 60, 70, 80, 90, 95]]}
    for r in ("r1", "r2"):
        send(
            client,
            {**window(r, 1, [100, 90, 80, 70], [90, 75, 60, 45], costs), "confidence": confidence},
        )
        send(client, window(r, 16, [100, 90, 80, 70], [50, 20, 10, 5], costs))
    client.xadd(rs.TELEMETRY, {"model": MODEL, "window": "{damaged"})  # skipped, not fatal
    ctl = Controller(redis_server.url, "ctl", Settings(tick_s=0.1, decide_every_s=0, search=False))
    ctl.start()
    try:
        text = wait_for(lambda: client.get(rs.model_key(MODEL, "current")), what="a decision")
    finally:
        ctl.stop()
    record = rs.Record.parse(text)
    assert record.reason == "decision" and record.by == "ctl"
    assert record.buckets["1"]["mode"] == "skip" and record.buckets["1"]["max_draft"] >= 2
    assert record.buckets["1"]["threshold"] == 0.5
    assert record.buckets["16"]["mode"] == "off" and "threshold" not in record.buckets["16"]
    assert record.draft["skip_attn"] == [8, 26]  # the replicas' skip set, kept
    assert record.evidence["buckets"]["1"]["predicted_speedup"] > 1
    record.drafts(30)  # a replica would accept it


def test_search_adopts_only_with_confidence():
    s = Search("a1.2.3|m")
    s.next_round(8, seed=0)
    assert s.candidates and all(k != s.incumbent for k in s.candidates)

    def row(key, hits, n):
        lo, hi = wilson(hits, n, 1.64), wilson(hits, n, -1.64)
        return {
            "key": key,
            "n": n,
            "low": forced_speedup(lo, 0.7, 0.02)[0],
            "high": forced_speedup(hi, 0.7, 0.02)[0],
        }

    rival = s.candidates[0]
    # Slightly better on few positions: not adopted.
    assert s.conclude([row(s.incumbent, 50, 100), row(rival, 56, 100)], 50) is None
    # Clearly better on many: adopted.
    assert s.conclude([row(s.incumbent, 500, 1000), row(rival, 800, 1000)], 50) == rival
    assert s.incumbent == rival and s.adopted[-1]["to"] == rival


def test_neighbours_are_valid_skip_sets():
    import random

    for key in ("a1|m", "a0.1.2.3|m0.1.2.3", "a|m3"):
        for k in neighbours(key, 4, random.Random(1)):
            attn, mlp = rs.parse_skip_key(k)
            assert (attn or mlp) and len(attn) + len(mlp) < 8 and k != key
            assert all(0 <= i < 4 for i in attn + mlp)
        # Without early exits allowed, no candidate is one.
        for k in neighbours(key, 30, random.Random(1), exits=False):
            assert rs.exit_layer_of(k, 30) is None


def test_choices_hold_unless_a_clear_gain():
    from services.controller.decide import Choice, choose_bucket
    from services.controller.evidence import ModelEvidence

    ev = ModelEvidence()
    costs = {"decode": {"1": 0.01}, "per_token": {"1": 0.0001}, "draft_pass": {}}
    ev.add(window("r1", 1, [100, 100, 100], [90, 80, 70], costs))
    rates = [0.9, 0.89, 0.875]
    fresh = choose_bucket(ev, 0, 1, "skip", rates, 0.5, ("off", "skip"), None)
    assert fresh.mode == "skip" and fresh.max_draft == 3
    # Two tokens were chosen before and three gain under 3%: two it stays.
    held = choose_bucket(ev, 0, 1, "skip", rates, 0.5, ("off", "skip"), Choice("skip", 2, 0.0))
    assert (held.mode, held.max_draft) == ("skip", 2)
    # Drafting costs more than it yields: off, whatever came before.
    poor = [0.1, 0.05, 0.01]
    off = choose_bucket(ev, 0, 1, "skip", poor, 0.9, ("off", "skip"), Choice("skip", 2, 0))
    assert off.mode == "off"


def test_search_moves_to_an_early_exit_and_publishes_it_as_one(redis_server):
    """Exits are searched beside skip sets, scored as the skip set they equal; an exit
    that wins is published as `early_exit` with its layer, which replicas accept."""
    client = redis_server.client()
    add_replica(client, MODEL, "r1")
    settings = Settings(tick_s=0.1, decide_every_s=0, min_positions=100, seed=3)
    ctl = Controller(redis_server.url, "ctl", settings)
    ctl.start()
    try:
        trial = wait_for(
            lambda: client.get(rs.model_key(MODEL, "candidates")), what="a search round"
        )
        keys = json.loads(trial)["keys"]
        exits = [k for k in keys if rs.exit_layer_of(k, 30) is not None]
        assert exits, f"no early exit among the candidates {keys}"
        # The incumbent skip set agrees on 20% of positions, the exit on 95%, the rest 10%.
        scores = {k: [10, 100] for k in keys}
        scores[keys[0]] = [20, 100]
        scores[exits[0]] = [950, 1000]
        send(client, {**window("r1", 1, [0], [0], {}), "modes": {}, "scores": scores})
        text = wait_for(lambda: client.get(rs.model_key(MODEL, "current")), what="an adoption")
    finally:
        ctl.stop()
    record = rs.Record.parse(text)
    layer = rs.exit_layer_of(exits[0], 30)
    assert record.reason == "search"
    assert record.draft["mode"] == "early_exit" and record.draft["exit_layer"] == layer
    assert record.draft["skip_attn"] == [] and record.draft["skip_mlp"] == []
    base, _ = record.drafts(30)  # a replica would accept it
    assert base.layer_mode == "early_exit"


def test_exit_keys_round_trip():
    key = rs.exit_key(20, 30)
    assert rs.exit_layer_of(key, 30) == 20
    assert rs.layer_key({"mode": "early_exit", "exit_layer": 20}, 30) == key
    assert rs.layer_key({"mode": "skip", "skip_attn": [3], "exit_layer": 20}, 30) == "a3|m"
    assert rs.exit_layer_of("a20.21|m20.21", 30) is None  # not up to the top
    assert rs.exit_layer_of("a0.1|m0.1", 2) is None  # everything: no exit
    assert rs.with_layer_draft({"mode": "skip"}, key, 30)["exit_layer"] == 20
    assert rs.layer_mode(key, 30) == "early_exit" and rs.layer_mode("a3|m", 30) == "skip"


def test_threshold_rises_only_where_tokens_are_shown_not_to_pay():
    from services.controller.decide import threshold

    # need = (0.3 + 0.02) * 1.5 = 0.48 agreement for a token to pay.
    args = (0.3, 0.02, 1.5)
    assert threshold(None, *args) == 0.0
    every_bin_pays = ([100] * 10, [60] * 10)
    assert threshold(every_bin_pays, *args) == 0.0
    low_bins_fail = ([100] * 10, [5, 10, 20, 30, 60, 70, 80, 85, 90, 95])
    assert threshold(low_bins_fail, *args) == 0.4
    too_few_to_tell = ([5] * 10, [0] * 10)  # fails, but on 5 tokens a bin: no evidence
    assert threshold(too_few_to_tell, *args) == 0.0
    nothing_pays = ([100] * 10, [10] * 10)
    assert threshold(nothing_pays, *args) == 0.9  # the highest a threshold goes
