"""The leader reads replica telemetry from the stream and publishes a decision: drafting
where the speedup model says it pays, off where it does not, per batch bucket."""

from __future__ import annotations

import json
import time

from controller_helpers import add_replica, wait_for

from services.common import redis_schema as rs
from services.controller.controller import Controller, Settings
from services.controller.decide import forced_speedup
from services.controller.evidence import wilson
from services.controller.search import Search, neighbours

MODEL = "m"


def window(replica: str, bucket: int, drafted: list[int], accepted: list[int], costs: dict):
    """A telemetry window as a FleetLink sends it: skip drafts at one batch bucket."""
    return {
        "model": MODEL,
        "replica": replica,
        "version": 0,
        "t0": time.time() - 1,
        "t1": time.time(),
        "modes": {
            f"skip/{bucket}": {"steps": drafted[0], "drafted": drafted, "accepted": accepted}
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
    for r in ("r1", "r2"):
        send(client, window(r, 1, [100, 90, 80, 70], [90, 75, 60, 45], costs))
        send(client, window(r, 16, [100, 90, 80, 70], [50, 20, 10, 5], costs))
    client.xadd(rs.TELEMETRY, {"model": MODEL, "window": "{damaged"})  # skipped, not fatal
    ctl = Controller(redis_server.url, "ctl", Settings(tick_s=0.1, decide_every_s=0, search=False))
    ctl.start()
    try:
        text = wait_for(lambda: client.get(rs.model_key(MODEL, "current")), 5, what="a decision")
    finally:
        ctl.stop()
    record = rs.Record.parse(text)
    assert record.reason == "decision" and record.by == "ctl"
    assert record.buckets["1"]["mode"] == "skip" and record.buckets["1"]["max_draft"] >= 2
    assert record.buckets["16"]["mode"] == "off"
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


def test_choices_hold_unless_a_clear_gain():
    from services.controller.decide import Choice, choose_bucket
    from services.controller.evidence import ModelEvidence

    ev = ModelEvidence()
    costs = {"decode": {"1": 0.01}, "per_token": {"1": 0.0001}, "draft_pass": {}}
    ev.add(window("r1", 1, [100, 100, 100], [90, 80, 70], costs))
    rates = [0.9, 0.89, 0.875]
    fresh = choose_bucket(ev, 0, 1, rates, 0.5, ("off", "skip"), None)
    assert fresh.mode == "skip" and fresh.max_draft == 3
    # Two tokens were chosen before and three gain under 3%: two it stays.
    held = choose_bucket(ev, 0, 1, rates, 0.5, ("off", "skip"), Choice("skip", 2, 0.0))
    assert (held.mode, held.max_draft) == ("skip", 2)
    # Drafting costs more than it yields: off, whatever came before.
    off = choose_bucket(ev, 0, 1, [0.1, 0.05, 0.01], 0.9, ("off", "skip"), Choice("skip", 2, 0))
    assert off.mode == "off"
