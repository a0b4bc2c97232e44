"""One controller leads through the Redis lease; a standby takes over when it dies, a
stale leader cannot write, and versions only go up.

Leadership is observed by events, never by the clock: Redis's keyspace notifications
for the lease key say when it was taken (`set`, then `expire` for its expiry), renewed
in place (`expire`), released (`del`) or ran out (`expired`), and the lease value is the
fencing token that config writes must present.
"""

from __future__ import annotations

import pytest
from controller_helpers import kill, leader_of, spawn_controller
from waiting import wait_for

from services.common import redis_schema as rs
from services.controller.controller import Controller, Settings
from services.controller.lease import Lease
from services.controller.store import ConfigStore, Fenced
from services.serve.local import free_port

LEASE_S = 2.0
# Renewals to watch while a standby tries: at the controller's tick, more than a lease time.
RENEWALS = int(LEASE_S / Settings().tick_s) + 1
MARK = "test:lease-events"


class LeaseEvents:
    """What happened to the lease key, in order, from Redis's keyspace notifications."""

    def __init__(self, client) -> None:
        client.config_set("notify-keyspace-events", "Kg$x")  # generic, string, expired
        self.client = client
        self.pubsub = client.pubsub()
        self.pubsub.subscribe(f"__keyspace@0__:{rs.LEASE}", MARK)
        self.events: list[str] = []
        # Once Redis confirms both subscriptions, no event is missed.
        for _ in range(2):
            assert self._next()["type"] == "subscribe"

    def so_far(self) -> list[str]:
        """Every event up to now: Redis delivers in order, so once a marker published now
        arrives, so has every event before it."""
        self.client.publish(MARK, "")
        while (msg := self._next())["channel"] != MARK:
            self.events.append(msg["data"])
        return list(self.events)

    def _next(self) -> dict:
        return wait_for(lambda: self.pubsub.get_message(timeout=0.1), every=0, what="a message")


def renewals(events: list[str]) -> int:
    """Each take is a `set` with its `expire`; every other `expire` is a renewal."""
    return events.count("expire") - events.count("set")


def set_calls(client) -> int:
    """SET commands Redis has run: a standby's tries for the lease (SET NX) among them."""
    return client.info("commandstats").get("cmdstat_set", {}).get("calls", 0)


def record(model: str = "m", max_draft: int = 2) -> rs.Record:
    return rs.Record(model, {"mode": "skip", "skip_attn": [3], "max_draft": max_draft})


def test_two_controller_processes_one_leads_and_a_standby_takes_over(redis_server):
    """Of two controller processes one takes the lease and keeps it by renewing in place
    while the other keeps trying; when the leader dies nobody releases its lease: it runs
    out on Redis's clock and only then does the standby take it, with its own token. The
    dead leader's token is fenced off, and versions go on rising."""
    client = redis_server.client()
    lease = LeaseEvents(client)
    extra = ("--lease-seconds", str(LEASE_S), "-v")
    a = spawn_controller(redis_server.url, "ctl-a", f"127.0.0.1:{free_port()}", *extra)
    b = spawn_controller(redis_server.url, "ctl-b", f"127.0.0.1:{free_port()}", *extra)
    procs = {"ctl-a": a, "ctl-b": b}
    try:
        first = wait_for(lambda: leader_of(client), what="a leader")
        token = client.get(rs.LEASE)
        tries = set_calls(client)
        wait_for(
            lambda: renewals(lease.so_far()) >= RENEWALS and set_calls(client) >= tries + RENEWALS,
            what="renewals while the standby tries",
        )
        # One take and renewals only: no try of the standby's ever replaced the lease.
        seen = lease.so_far()
        assert seen == ["set"] + ["expire"] * (len(seen) - 1)
        assert client.get(rs.LEASE) == token
        store = ConfigStore(client)
        v1 = store.publish(record(), token).version
        kill(procs[first])
        second = wait_for(
            lambda: (leader := leader_of(client)) and leader != first and leader,
            what="takeover",
        )
        assert second in procs and client.get(rs.LEASE) != token
        # Renewals aside, the lease ran out before anything else, then the standby took it.
        after_kill = [e for e in lease.so_far()[len(seen) :] if e != "expire"]
        assert after_kill == ["expired", "set"]
        with pytest.raises(Fenced):  # the dead leader's token is worthless now
            store.publish(record(), token)
        v2 = store.publish(record(max_draft=3), client.get(rs.LEASE)).version
        assert v2 > v1
    finally:
        for p in procs.values():
            kill(p)


def test_stale_leader_is_fenced_and_versions_stay_monotonic(redis_server):
    """A leader that pauses (no renewals) keeps the lease until it runs out on Redis's
    clock; the standby, trying all along, takes it only then. The paused leader's token is
    fenced off, it stands by once back, and versions rise across the change."""
    lease = LeaseEvents(redis_server.client())
    settings = Settings(lease_s=LEASE_S, tick_s=0.1)
    a = Controller(redis_server.url, "a", settings)
    b = Controller(redis_server.url, "b", settings)
    a.tick()
    b.tick()
    assert a.is_leader and not b.is_leader
    versions = [a.store.publish(record(), a.lease.token).version for _ in range(3)]
    wait_for(lambda: (b.tick(), b.is_leader)[1], what="b to lead")
    # a's take, its lease running out, b's take: b's failed tries wrote nothing.
    handover = ["set", "expire", "expired", "set", "expire"]
    assert lease.so_far() == handover
    assert not a.lease.held  # `a` stops acting on its own clock, too
    with pytest.raises(Fenced):
        a.store.publish(record(), a.lease.token)
    versions.append(b.store.publish(record(), b.lease.token).version)
    a.tick()  # back from its pause, `a` finds the lease taken and stands by
    assert not a.is_leader and b.is_leader
    assert lease.so_far() == handover  # a's try changed nothing either
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
    """The holder's `keep` renews the lease in place (one `expire` event, the same token)
    and gives it back its full time; a contender's `keep` changes nothing; a release frees
    it for the contender at once."""
    client = redis_server.client()
    lease = LeaseEvents(client)
    # A long lease: nothing runs out by itself in this test.
    a, b = Lease(client, "a", 60.0), Lease(client, "b", 60.0)
    assert a.keep() and not b.keep()
    assert lease.so_far() == ["set", "expire"]
    for _ in range(3):
        client.pexpire(rs.LEASE, 1_000)  # as if most of the lease's time had gone by
        before = len(lease.so_far())
        assert a.keep() and not b.keep()
        assert lease.so_far()[before:] == ["expire"]  # a renewal, and nothing from `b`
        assert client.get(rs.LEASE) == a.token and client.pttl(rs.LEASE) > 1_000
    assert a.leader() == "a"
    a.release()
    assert b.keep() and b.leader() == "b"
    assert lease.so_far()[-3:] == ["del", "set", "expire"]
