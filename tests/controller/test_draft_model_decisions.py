"""The controller weighs a draft model (mode `model`) as one more drafter per batch bucket:
chosen where its measured acceptance and cost pay more than the others, not where they do
not, and never for a model some of whose replicas have no draft model."""

from __future__ import annotations

import json

import pytest
from controller_helpers import add_replica, kill, spawn_controller
from test_admin import _serving, run
from test_decisions import window as decisions_window
from waiting import wait_for

from services.common import redis_schema as rs
from services.controller.decide import choose_bucket
from services.controller.evidence import ModelEvidence
from services.serve.local import free_port

MODEL = "m"
SKIP_RATES = [0.6, 0.5, 0.4]  # the layer draft's acceptance per position
SKIP_COST = 0.3  # its pass, relative to a plain step
COSTS = {
    "decode": {"1": 0.010},
    "per_token": {"1": 0.0002},
    "draft_pass": {"skip/1": 0.003, "model/1": 0.002},  # the draft model: 0.2 of a step
}
GOOD = ([100, 95, 90, 85], [95, 88, 80, 72])  # drafted, accepted per position: it pays
POOR = ([100, 20, 5], [20, 4, 1])  # one in five accepted: it does not


def window(replica: str, drafted: list[int], accepted: list[int], costs: dict = COSTS) -> dict:
    """A telemetry window as a FleetLink sends it: draft-model drafts at batch bucket 1."""
    return decisions_window(replica, 1, drafted, accepted, costs, mode="model")


def evidence(drafted: list[int], accepted: list[int], costs: dict = COSTS) -> ModelEvidence:
    ev = ModelEvidence()
    ev.add(window("r1", drafted, accepted, costs))
    return ev


def choose(ev: ModelEvidence, model_cost: float | None, previous=None):
    modes = ("off", "ngram", "skip", "model", "auto")
    return choose_bucket(ev, 0, 1, "skip", SKIP_RATES, SKIP_COST, modes, previous, model_cost)


def choose_alone(ev: ModelEvidence, model_cost: float | None):
    """As `choose`, with `auto` (which lets the engine pick per sequence) not allowed."""
    modes = ("off", "ngram", "skip", "model")
    return choose_bucket(ev, 0, 1, "skip", SKIP_RATES, SKIP_COST, modes, None, model_cost)


def test_the_draft_model_is_chosen_where_it_pays_most():
    ev = evidence(*GOOD)
    cost, _ = ev.relative_costs("model", 1)
    choice = choose_alone(ev, cost)
    assert choice.mode == "model" and choice.max_draft >= 2
    assert choice.speedup > choose_alone(ev, None).speedup  # better than the layer draft
    # The layer draft pays too: with `auto` allowed, the engine weighs both per sequence,
    # valued at the better one's speedup.
    both = choose(ev, cost)
    assert both.mode == "auto" and both.speedup == choice.speedup


def test_the_draft_model_is_not_chosen_where_it_does_not_pay():
    ev = evidence(*POOR)
    choice = choose(ev, ev.relative_costs("model", 1)[0])
    assert choice.mode == "skip"  # the layer draft pays more
    # Costly enough, even good acceptance does not pay for it.
    assert choose(evidence(*GOOD), 3.0).mode == "skip"


def test_the_draft_model_never_competes_without_one():
    """No draft-model cost means the replicas have none: whatever the evidence says."""
    ev = evidence(*GOOD)
    assert choose(ev, None).mode != "model"
    allowed = ("off", "skip")  # as the controller passes them for such a model
    choice = choose_bucket(ev, 0, 1, "skip", SKIP_RATES, SKIP_COST, allowed, None, 0.2)
    assert choice.mode == "skip"


def add_drafting_replica(client, rid: str, draft_model: str = "first-layers") -> None:
    """A replica's heartbeat, as a FleetLink with a draft model writes it."""
    add_replica(client, MODEL, rid)
    key = rs.model_key(MODEL, "replicas")
    state = json.loads(client.hget(key, rid))
    state.update(draft_model=draft_model, draft_model_share=0.25)
    client.hset(key, rid, json.dumps(state))


def send(client, w: dict) -> None:
    client.xadd(
        rs.TELEMETRY, {"model": w["model"], "replica": w["replica"], "window": json.dumps(w)}
    )


@pytest.fixture
def controller(redis_server):
    """A controller process with its admin API; yields (admin address, Redis client)."""
    client = redis_server.client()
    address = f"127.0.0.1:{free_port()}"
    proc = spawn_controller(
        redis_server.url, "ctl", address, "--no-search", "--decide-seconds", "0"
    )
    try:
        import grpc
        from grpc_health.v1 import health_pb2_grpc

        with grpc.insecure_channel(address) as channel:
            wait_for(lambda: _serving(health_pb2_grpc.HealthStub(channel)), what="the admin API")
        yield address, client
    finally:
        kill(proc)


def decision(client) -> rs.Record:
    text = wait_for(lambda: client.get(rs.model_key(MODEL, "current")), 30, what="a decision")
    return rs.Record.parse(text)


@pytest.mark.timeout(120)
def test_the_controller_chooses_the_draft_model_and_status_shows_it(controller, capsys):
    address, client = controller
    for rid in ("r1", "r2"):
        add_drafting_replica(client, rid)
        send(client, window(rid, *GOOD))
    record = decision(client)
    assert record.buckets["1"]["mode"] == "model" and record.draft["mode"] == "model"
    assert record.evidence["buckets"]["1"]["acceptance"]["model"] > 0.8
    record.drafts(30)  # a replica would accept it
    code, out = run(capsys, "status", "--admin", address)
    assert code == 0
    assert "batch <= 1: model" in out and "draft model first-layers" in out


@pytest.mark.timeout(120)
def test_no_draft_model_is_chosen_where_a_replica_has_none(controller):
    _, client = controller
    add_drafting_replica(client, "r1")
    add_replica(client, MODEL, "r2")  # no draft model: it would refuse mode `model`
    for rid in ("r1", "r2"):
        send(client, window(rid, *GOOD))
    record = decision(client)
    assert record.draft["mode"] != "model"
    assert all(b.get("mode") != "model" for b in record.buckets.values())
