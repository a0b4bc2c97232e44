"""One controller leads through the Redis lease; a standby takes over when it dies, a
stale leader cannot write, and versions only go up."""

from __future__ import annotations

import time

import pytest
from controller_helpers import kill, leader_of, spawn_controller, wait_for

from services.common import redis_schema as rs
from services.controller.controller import Controller, Settings
from services.controller.lease import Lease
from services.controller.store import ConfigStore, Fenced
from services.serve.local import free_port

LEASE_S = 1.5


def record(model: str = "m", max_draft: int = 2) -> rs.Record:
    return rs.Record(model, {"mode": "skip", "skip_attn": [3], "max_draft": max_draft})


def test_two_controller_processes_one_leads_and_a_standby_takes_over(redis_server):
    client = redis_server.client()
    extra = ("--lease-seconds", str(LEASE_S), "-v")
    a = spawn_controller(redis_server.url, "ctl-a", f"127.0.0.1:{free_port()}", *extra)
    b = spawn_controller(redis_server.url, "ctl-b", f"127.0.0.1:{free_port()}", *extra)
    procs = {"ctl-a": a, "ctl-b": b}
    try:
        first = wait_for(lambda: leader_of(client), 20, what="a leader")
        time.sleep(LEASE_S)  # the standby keeps trying meanwhile: leadership must hold
        assert leader_of(client) == first
        store = ConfigStore(client)
        token = client.get(rs.LEASE)
        v1 = store.publish(record(), token).version
        killed = time.monotonic()
        kill(procs[first])
        second = wait_for(
            lambda: (leader := leader_of(client)) and leader != first and leader,
            10,
            what="takeover",
        )
        # Within the lease time, plus the standby's tick.
        assert time.monotonic() - killed < LEASE_S + 1.5
        assert second in procs and second != first
        with pytest.raises(Fenced):  # the dead leader's token is worthless now
            store.publish(record(), token)
        v2 = store.publish(record(max_draft=3), client.get(rs.LEASE)).version
        assert v2 > v1
    finally:
        for p in procs.values():
            kill(p)


def test_stale_leader_is_fenced_and_versions_stay_monotonic(redis_server):
    settings = Settings(lease_s=LEASE_S, tick_s=0.1)
    a = Controller(redis_server.url, "a", settings)
    b = Controller(redis_server.url, "b", settings)
    a.tick()
    b.tick()
    assert a.is_leader and not b.is_leader
    versions = [a.store.publish(record(), a.lease.token).version for _ in range(3)]
    # `a` pauses (no renewals) past its lease: `b` takes over.
    wait_for(lambda: (b.tick(), b.is_leader)[1], LEASE_S + 1, what="b to lead")
    assert not a.lease.held  # `a` stops acting on its own clock, too
    with pytest.raises(Fenced):
        a.store.publish(record(), a.lease.token)
    versions.append(b.store.publish(record(), b.lease.token).version)
    a.tick()  # back from its pause, `a` finds the lease taken and stands by
    assert not a.is_leader and b.is_leader
    assert versions == sorted(set(versions))
    history = b.store.history("m")
    assert [r.version for r in history] == sorted(versions, reverse=True)


def test_version_floor_survives_a_counter_reset(redis_server):
    """A Redis restarted without persistence forgets the counter; the floor (the highest
    version replicas report) keeps versions going up."""
    client = redis_server.client()
    lease = Lease(client, "a", LEASE_S)
    assert lease.keep()
    store = ConfigStore(client)
    v = store.publish(record(), lease.token).version
    client.delete(rs.VERSION)
    assert store.publish(record(), lease.token, floor=v).version == v + 1


def test_history_keeps_the_newest_versions(redis_server):
    """The history is bounded: each write drops the oldest beyond `keep`, and rollback
    still finds the previous config."""
    client = redis_server.client()
    store = ConfigStore(client, keep=3)
    client.hset(rs.model_key("m", "history"), "junk", "{not a record")  # never counted
    versions = [store.publish(record(max_draft=k % 2 + 2), None).version for k in range(6)]
    kept = store.history("m", limit=100)
    assert [r.version for r in kept] == versions[:-4:-1]
    assert client.hexists(rs.model_key("m", "history"), "junk")
    back = store.rollback("m", by="test")
    assert back.draft["max_draft"] != kept[0].draft["max_draft"]
    assert [r.version for r in store.history("m", limit=100)] == [back.version, *versions[:-3:-1]]


def test_lease_renewal_and_release(redis_server):
    client = redis_server.client()
    a, b = Lease(client, "a", LEASE_S), Lease(client, "b", LEASE_S)
    assert a.keep() and not b.keep()
    for _ in range(4):  # renewals keep it past its first expiry
        time.sleep(LEASE_S / 3)
        assert a.keep() and not b.keep()
    assert a.leader() == "a"
    a.release()
    assert b.keep() and b.leader() == "b"
