"""Replicas apply good records, refuse bad ones (keeping the last good config, and
reporting why), and keep serving through a Redis outage."""

from __future__ import annotations

import json
import time

import pytest
from controller_helpers import replica, wait_for

from services.common import redis_schema as rs
from services.common.fleet import FleetLink
from services.controller.admin import Admin
from services.controller.client import status_dict
from services.controller.controller import Controller
from services.controller.store import ConfigStore
from services.engine import SamplingParams

MODEL = "smollm"
PROMPTS = ["Name three colours.", "Count from one to five."]
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


def test_good_record_applies_between_steps(replicas, redis_server):
    engines, links = replicas
    store = ConfigStore(redis_server.client())
    published = time.monotonic()
    v = store.publish(good(3), None).version
    wait_for(lambda: all(fl.version == v for fl in links), 1.5, what="the announcement")
    assert time.monotonic() - published < 1.5
    for e in engines:
        assert e.default_draft.max_draft == 3 and e.default_draft.skip_attn == (8, 26)
        assert e._bucket_draft(e.default_draft, 3).mode == "off"  # the bucket override
        assert e._bucket_draft(e.default_draft, 1) is e.default_draft


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
    engines, links = replicas
    client = redis_server.client()
    store = ConfigStore(client)
    v = store.publish(good(3), None).version
    wait_for(lambda: all(fl.version == v for fl in links), 2, what="the good version")
    kept = [e.default_draft for e in engines]
    for i, (name, text) in enumerate(corrupt_records(v).items()):
        client.set(rs.model_key(MODEL, "current"), text)
        client.publish(rs.CHANNEL, json.dumps({"model": MODEL, "version": 10**6}))
        expected = 2 * (i + 1)  # both replicas refuse each record, once
        wait_for(
            lambda n=expected: len(store.rejections(MODEL, 100)) >= n,
            3,
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
    wait_for(lambda: all(fl.version == v2 for fl in links), 2, what="recovery")


def test_redis_outage_keeps_outputs_and_reconnects(engine, redis_server):
    e = replica(engine)
    fl = link(e, redis_server.url, "r0")
    try:
        store = ConfigStore(redis_server.client())
        v = store.publish(good(3), None).version
        wait_for(lambda: fl.version == v, 2, what="the first version")
        before = [c.token_ids for c in e.generate(PROMPTS, GREEDY)]
        redis_server.stop()
        wait_for(lambda: not fl.connected, 5, what="the link to notice")
        t0 = time.monotonic()
        during = [c.token_ids for c in e.generate(PROMPTS, GREEDY)]
        assert during == before  # same config, same greedy output, no waiting on Redis
        assert time.monotonic() - t0 < 60
        assert fl.version == v and e.default_draft.max_draft == 3
        redis_server.start()  # empty: no persistence
        wait_for(lambda: fl.connected, 10, what="the link to reconnect")
        client = redis_server.client()
        wait_for(lambda: store.highest_seen(MODEL) == v, 5, what="the replica's heartbeat")
        store = ConfigStore(client)
        v2 = store.publish(good(2), None, floor=store.highest_seen(MODEL)).version
        assert v2 > v
        wait_for(lambda: fl.version == v2, 2, what="the next version")
        assert e.default_draft.max_draft == 2
        assert [c.token_ids for c in e.generate(PROMPTS, GREEDY)] == before  # exact, always
        wait_for(lambda: client.xlen(rs.TELEMETRY) > 0, 5, what="telemetry after the outage")
    finally:
        fl.stop()
