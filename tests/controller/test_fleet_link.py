"""Replicas apply good records between engine steps, refuse bad ones (keeping the last
good config, and reporting why), and keep serving with the last good config through a
Redis outage.

Which config is in force is observed step by step (`StepLog`): the config version at
each engine step's start and end, its batch size, and the drafting it ran with. Equal
greedy output is no evidence of it: that holds under any config.
"""

from __future__ import annotations

import contextlib
import json
import threading
from dataclasses import dataclass

import pytest
from controller_helpers import replica
from waiting import wait_for

from services.common import redis_schema as rs
from services.controller.admin import Admin
from services.controller.client import status_dict
from services.controller.controller import Controller
from services.controller.store import ConfigStore
from services.engine import SamplingParams
from services.engine.drafting.costs import bucket
from services.engine.params import DraftConfig
from services.serve.fleet_link import FleetLink

MODEL = "smollm"
PROMPTS = ["Name three colours.", "Count from one to five."]
# Four at once: prefilled one per step, they run at batch sizes 1 to 4, so both under the
# base config and under the bucket-4 override of `good`.
FOUR = [*PROMPTS, "Say hello in French.", "What is two plus two?"]
GREEDY = SamplingParams(max_tokens=12, ignore_eos=True)


def good(max_draft: int, skip_attn=(8, 26)) -> rs.Record:
    draft = {"mode": "skip", "skip_attn": list(skip_attn), "skip_mlp": [], "max_draft": max_draft}
    return rs.Record(MODEL, draft, {"4": {"mode": "off", "max_draft": 1}}, reason="test")


def link(engine, url: str, rid: str) -> FleetLink:
    fl = FleetLink(engine, url, MODEL, rid, interval_s=0.2, poll_s=0.5, score=False)
    fl.start()
    return fl


@pytest.fixture
def replicas(engine, redis_server):
    engines = [replica(engine), replica(engine)]
    links = [link(e, redis_server.url, f"r{i}") for i, e in enumerate(engines)]
    yield engines, links
    for fl in links:
        fl.stop()


@dataclass(frozen=True)
class Step:
    """One engine step as it ran."""

    version_at_start: int  # the fleet config version when the step began
    version_at_end: int  # ... and when it ended
    batch: int
    draft: DraftConfig


class StepLog:
    """Every step an engine runs from now on; `during_next(fn)` runs `fn` inside the next
    step, as something that happens while the step computes."""

    def __init__(self, engine, monkeypatch) -> None:
        self.engine = engine
        self.steps: list[Step] = []
        self._during_next = None
        self._step = engine.step
        monkeypatch.setattr(engine, "step", self._logged)

    def during_next(self, fn) -> None:
        self._during_next = fn

    def _logged(self, seqs, cfg: DraftConfig) -> None:
        start = self.engine.config_version
        during, self._during_next = self._during_next, None
        if during is not None:
            during()
        self._step(seqs, cfg)
        self.steps.append(Step(start, self.engine.config_version, len(seqs), cfg))


def assert_in_force(record: rs.Record, engine, steps: list[Step]) -> None:
    """Every step ran under `record`: its version from start to end, and the drafting it
    sets for the step's batch size. The steps must include both a batch under a bucket
    override and one under the base config, or the check would prove nothing."""
    base, by_bucket = record.drafts(engine.model.num_layers)
    ran = {bucket(s.batch) for s in steps}
    assert set(by_bucket) <= ran and ran - set(by_bucket), f"steps ran in buckets {ran} only"
    for s in steps:
        assert (s.version_at_start, s.version_at_end) == (record.version, record.version), s
        assert s.draft == by_bucket.get(bucket(s.batch), base), s


def test_a_record_arriving_mid_step_applies_between_steps(engine, redis_server, monkeypatch):
    """A record announced while a step runs waits for that step: the step ends on the
    version it began with, the record is in force from the next step on, the request
    already running keeps the drafting it began with, and new requests run the new
    record's drafting (its bucket override too)."""
    e = replica(engine)
    fl = link(e, redis_server.url, "r0")
    try:
        store = ConfigStore(redis_server.client())
        old = store.publish(good(2), None)
        wait_for(lambda: fl.version == old.version, what="the first config")
        applying = threading.Event()  # the link has a record and is applying it
        apply_draft = e.apply_draft

        def announced_apply(*args, **kwargs):
            applying.set()
            apply_draft(*args, **kwargs)

        monkeypatch.setattr(e, "apply_draft", announced_apply)
        steps = StepLog(e, monkeypatch)
        announced = []

        def announce() -> None:  # inside a step: publish, and let the link reach the engine
            announced.append(store.publish(good(3), None))
            wait_for(applying.is_set, what="the link to apply the record")

        steps.during_next(announce)
        seq = e.add_request(PROMPTS[0], GREEDY)
        e.step_once()  # a prefill, then the first decode step: `announce` runs inside it
        (new,) = announced
        wait_for(lambda: fl.version == new.version, what="the record, between steps")
        while not seq.finished:
            e.step_once()
        first, *rest = steps.steps
        assert (first.version_at_start, first.version_at_end) == (old.version, old.version)
        assert rest and {(s.version_at_start, s.version_at_end) for s in rest} == {
            (new.version, new.version)
        }
        old_draft, _ = old.drafts(e.model.num_layers)
        assert {s.draft for s in steps.steps} == {old_draft}  # the running request's own
        steps.steps.clear()
        e.generate(FOUR, GREEDY)
        assert_in_force(new, e, steps.steps)
    finally:
        fl.stop()


def corrupt_records(version: int) -> dict[str, str]:
    bad_layers = good(2, skip_attn=(8, 99))
    tampered = json.loads(good(2).to_json())
    tampered["draft"]["max_draft"] = 16  # content changed, hash not
    foreign = rs.Record("other-model", good(2).draft)
    too_long = rs.Record(MODEL, {**good(2).draft, "max_draft": 2}, {"1": {"max_draft": 9}})
    out = {"garbage": "{not json", "tampered": tampered, "layers": bad_layers}
    out |= {"foreign": foreign, "too_long": too_long}
    texts = {}
    for i, (name, rec) in enumerate(out.items()):
        if isinstance(rec, rs.Record):
            rec.version = version + 1 + i
            rec = json.loads(rec.to_json())
        if isinstance(rec, dict):
            rec["version"] = version + 1 + i
            rec = json.dumps(rec)
        texts[name] = rec
    return texts


def test_corrupt_and_foreign_records_are_refused_and_reported(replicas, redis_server):
    """Every damaged, tampered, foreign or out-of-range record is refused by each replica,
    which keeps its last good version and says why, as `status` shows; a good record
    after them applies."""
    engines, links = replicas
    client = redis_server.client()
    store = ConfigStore(client)
    v = store.publish(good(3), None).version
    wait_for(lambda: all(fl.version == v for fl in links), what="the good version")
    kept = [e.default_draft for e in engines]
    for i, (name, text) in enumerate(corrupt_records(v).items()):
        client.set(rs.model_key(MODEL, "current"), text)
        client.publish(rs.CHANNEL, json.dumps({"model": MODEL, "version": 10**6}))
        expected = 2 * (i + 1)  # both replicas refuse each record, once
        wait_for(
            lambda n=expected: len(store.rejections(MODEL, 100)) >= n,
            what=f"both replicas to refuse the {name} record",
        )
    for fl, e, cfg in zip(links, engines, kept, strict=True):
        assert fl.version == v and e.default_draft == cfg
    # The controller's status shows every refusal, by replica, with why.
    controller = Controller(redis_server.url, "ctl")
    status = status_dict(Admin(controller)._status())
    rejections = status["models"][MODEL]["rejections"]
    assert {r["replica_id"] for r in rejections} == {"r0", "r1"}
    reasons = " | ".join(r["reason"] for r in rejections)
    for words in ("not JSON", "hash", "layers [99]", "other-model", "more than the base"):
        assert words in reasons
    assert all(r["kept_version"] == v for r in rejections)
    # A good record after the bad ones applies.
    v2 = store.publish(good(2), None, floor=v + 10).version
    wait_for(lambda: all(fl.version == v2 for fl in links), what="recovery")


def broken_link(monkeypatch, drop) -> threading.Event:
    """A deliberately broken link, for negative controls: once Redis goes away it runs
    `drop(engine)` on the engine it serves. The event says it has."""
    dropped = threading.Event()
    guard = FleetLink._guard

    def dropping_guard(self, fn) -> bool:
        was_connected = self.connected
        ok = guard(self, fn)
        if was_connected and not self.connected and not dropped.is_set():
            drop(self.engine)
            dropped.set()
        return ok

    monkeypatch.setattr(FleetLink, "_guard", dropping_guard)
    return dropped


def startup_config(engine):
    """A drop: back to the config the engine started with, as if no record had come."""
    startup = engine.default_draft
    return lambda e: e.apply_draft(startup, 0)


def no_bucket_overrides(engine):
    """A drop: the base config and its version stay, the bucket overrides go."""
    return lambda e: e.apply_draft(e.default_draft, e.config_version)


@pytest.mark.parametrize(
    "drop",
    [None, startup_config, no_bucket_overrides],
    ids=["keeps-the-config", "broken-to-startup-config", "broken-no-bucket-overrides"],
)
def test_redis_outage_keeps_the_last_good_config(engine, redis_server, monkeypatch, drop):
    """Through a Redis outage the replica serves on with the last good record in force:
    every step taken while Redis is away runs that record's version and the drafting it
    sets for the step's batch size. Negative controls: links broken to drop the config
    (or just its bucket overrides) when Redis goes away fail that check, while their
    greedy output stays the same, which is why output alone shows nothing."""
    e = replica(engine)
    dropped = broken_link(monkeypatch, drop(e)) if drop else None
    fl = link(e, redis_server.url, "r0")
    try:
        record = ConfigStore(redis_server.client()).publish(good(3), None)
        wait_for(lambda: fl.version == record.version, what="the config")
        before = [c.token_ids for c in e.generate(FOUR, GREEDY)]
        redis_server.stop()
        wait_for(lambda: not fl.connected, what="the link to notice")
        if dropped is not None:
            wait_for(dropped.is_set, what="the broken link to drop its config")
        steps = StepLog(e, monkeypatch)
        during = [c.token_ids for c in e.generate(FOUR, GREEDY)]
        with pytest.raises(AssertionError) if drop else contextlib.nullcontext():
            assert_in_force(record, e, steps.steps)
        assert during == before  # exact under any config, no waiting on Redis
    finally:
        fl.stop()


def test_link_reconnects_after_a_redis_outage(engine, redis_server, monkeypatch):
    """When Redis comes back empty (no persistence), the link reconnects on its own, its
    heartbeat reports the version it kept so the next version is higher, that version is
    in force from then on (greedy output exact, as always), and telemetry flows again."""
    e = replica(engine)
    fl = link(e, redis_server.url, "r0")
    try:
        v = ConfigStore(redis_server.client()).publish(good(3), None).version
        wait_for(lambda: fl.version == v, what="the first version")
        before = [c.token_ids for c in e.generate(FOUR, GREEDY)]
        redis_server.stop()
        wait_for(lambda: not fl.connected, what="the link to notice")
        redis_server.start()
        wait_for(lambda: fl.connected, what="the link to reconnect")
        client = redis_server.client()
        store = ConfigStore(client)
        wait_for(lambda: store.highest_seen(MODEL) == v, what="the replica's heartbeat")
        record = store.publish(good(2), None, floor=store.highest_seen(MODEL))
        assert record.version > v
        wait_for(lambda: fl.version == record.version, what="the next version")
        steps = StepLog(e, monkeypatch)
        assert [c.token_ids for c in e.generate(FOUR, GREEDY)] == before
        assert_in_force(record, e, steps.steps)
        wait_for(lambda: client.xlen(rs.TELEMETRY) > 0, what="telemetry after the outage")
    finally:
        fl.stop()
