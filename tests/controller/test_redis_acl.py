"""Redis ACL users per role (services/common/redis_acl.py), against a real redis-server.

The users are created the way an operator creates them on an external Redis (the
`ACL SETUSER` lines of `python -m services.common.redis_acl`), or the way `selfspec
serve` does (an aclfile); the test's own client stays the `default` user, to observe.
"""

from __future__ import annotations

import logging
import os
import stat
from string import Template

import pytest
import redis
from controller_helpers import kill, replica, spawn_controller
from waiting import wait_for

from services.common import redis_acl
from services.common import redis_schema as rs
from services.common.params import SamplingParams
from services.controller.admin import Admin
from services.controller.client import status_dict
from services.controller.controller import Controller, Settings
from services.controller.store import PUBLISH
from services.serve.fleet_link import FleetLink
from services.serve.local import Fleet, FleetOptions, free_port

MODEL = "smollm-acl"


@pytest.fixture
def users(redis_server) -> dict[str, str]:
    """role -> the URL that logs in as its user, created from the operator's lines."""
    admin = redis_server.client()
    passwords = redis_acl.new_passwords()
    lines = Template(redis_acl.setuser_commands()).substitute(
        {f"REDIS_{user.upper()}_PASSWORD": pw for user, pw in passwords.items()}
    )
    for line in lines.splitlines():
        assert admin.execute_command(*line.split()) == "OK", line
    admin.execute_command("ACL", "LOG", "RESET")
    return {u: rs.with_credentials(redis_server.url, u, pw) for u, pw in passwords.items()}


def record(max_draft: int = 3) -> rs.Record:
    draft = {"mode": "skip", "skip_attn": [8, 26], "skip_mlp": [], "max_draft": max_draft}
    return rs.Record(MODEL, draft, reason="test")


def telemetry_fields() -> dict[str, str]:
    return {"model": MODEL, "replica": "r0", "window": "{}"}


# What a replica's credential must not do: steer the fleet's drafting or its leadership.
FORBIDDEN = {
    "set-current": lambda r: r.set(rs.model_key(MODEL, "current"), record().to_json()),
    "del-current": lambda r: r.delete(rs.model_key(MODEL, "current")),
    "write-history": lambda r: r.hset(rs.model_key(MODEL, "history"), "9", "{}"),
    "bump-version": lambda r: r.execute_command("INCR", rs.VERSION),  # as the Lua script
    "pin": lambda r: r.set(rs.model_key(MODEL, "pin"), "1"),
    "take-lease": lambda r: r.set(rs.LEASE, "replica|x", nx=True, px=5000),
    "read-lease": lambda r: r.get(rs.LEASE),
    "release-lease": lambda r: r.delete(rs.LEASE),
    "publish-script": lambda r: r.eval(PUBLISH, 1, rs.LEASE),
    "announce": lambda r: r.publish(rs.CHANNEL, '{"model": "m", "version": 99}'),
    "write-candidates": lambda r: r.set(rs.model_key(MODEL, "candidates"), "{}"),
    "trim-telemetry": lambda r: r.xtrim(rs.TELEMETRY, maxlen=0),
    "flush": lambda r: r.flushall(),
}


def test_replica_appends_telemetry_and_reads_configs(users, redis_server):
    admin = redis_server.client()
    admin.set(rs.model_key(MODEL, "current"), "the current record")
    client = rs.connect(users["replica"])
    assert client.xadd(rs.TELEMETRY, telemetry_fields(), maxlen=100, approximate=True)
    assert client.xadd(rs.REJECTIONS, {"model": MODEL, "reason": "test"})
    assert client.get(rs.model_key(MODEL, "current")) == "the current record"
    assert admin.xlen(rs.TELEMETRY) == 1 and admin.xlen(rs.REJECTIONS) == 1


@pytest.mark.parametrize("what", list(FORBIDDEN))
def test_replica_may_not_write_configs_or_touch_the_lease(users, redis_server, what):
    with pytest.raises(redis.exceptions.NoPermissionError):
        FORBIDDEN[what](rs.connect(users["replica"]))
    assert redis_server.client().get(rs.model_key(MODEL, "current")) is None


@pytest.mark.parametrize("what", ["set-current", "take-lease", "bump-version", "announce"])
def test_the_controller_may_do_what_a_replica_may_not(users, what):
    """The control for the test above: the same calls pass as the controller's user."""
    FORBIDDEN[what](rs.connect(users["controller"]))


def test_the_gateway_without_a_credential_gets_nothing(users, redis_server):
    """No user in the URL is the `default` user: once an operator has turned it off (as
    `selfspec serve` does), a client without a role's credential is refused."""
    redis_server.client().execute_command("ACL", "SETUSER", "default", "off")
    with pytest.raises(redis.AuthenticationError):
        rs.connect(redis_server.url).get(rs.model_key(MODEL, "current"))


def test_fleet_link_and_controller_work_together_under_their_users(engine, users, redis_server):
    """A replica's FleetLink as `replica` and a controller as `controller`: the controller
    leads, publishes a config the link applies, reads the link's telemetry, and serves
    status, pin, rollback and unpin; Redis denied neither of them anything."""
    admin = redis_server.client()
    e = replica(engine)
    fl = FleetLink(e, users["replica"], MODEL, "r0", interval_s=0.2, poll_s=0.5, score=False)
    settings = Settings(lease_s=2.0, tick_s=0.2, decide_every_s=3600.0)
    controller = Controller(users["controller"], "ctl-acl", settings)
    e.start()
    fl.start()
    controller.start()
    try:
        wait_for(lambda: controller.is_leader, what="the controller to lead")
        wait_for(lambda: MODEL in controller.store.models(), what="the replica's heartbeat")
        first = controller.store.publish(record(3), controller.lease.token)  # fenced
        wait_for(lambda: fl.version == first.version, what="the link to apply the config")
        e.generate(["Count from one to five."], SamplingParams(max_tokens=16, ignore_eos=True))

        def windows() -> int:
            state = controller.models.get(MODEL)
            return state.evidence.windows if state else 0

        wait_for(windows, what="the controller to read the replica's telemetry")
        second = controller.store.publish(record(2), controller.lease.token)
        wait_for(lambda: fl.version == second.version, what="the second config")
        status = status_dict(Admin(controller)._status())
        assert status["leader_id"] == "ctl-acl" and "r0" in status["models"][MODEL]["replicas"]
        pinned = controller.store.pin(MODEL, first.version, "operator")
        rolled = controller.store.rollback(MODEL, "operator")
        assert rolled.hash == second.hash != pinned.hash
        controller.store.unpin(MODEL)
        wait_for(lambda: fl.version == rolled.version, what="the rollback to apply")
    finally:
        controller.stop()
        fl.stop()
        e.shutdown()
    assert admin.get(rs.LEASE) is None, "the controller released its lease"
    denied = admin.execute_command("ACL", "LOG")
    assert denied == [], f"a role was denied something its code does: {denied}"


def controller_run(url: str, name: str, *args: str) -> tuple[int, str]:
    """`selfspec controller run` against `url` until it exits: its code and its output."""
    proc = spawn_controller(url, name, f"127.0.0.1:{free_port()}", *args)
    try:
        out, _ = proc.communicate(timeout=120)
    finally:
        kill(proc)
    return proc.returncode, out.decode()


def test_controller_with_a_wrong_password_says_what_to_check(users):
    """`selfspec controller run` stops at once, naming the user and what to check: a
    wrong password is no outage to wait out."""
    url = rs.with_credentials(users["controller"], password="not-the-password-4711")
    code, text = controller_run(url, "ctl-wrong", "--wait-redis", "600")
    assert code != 0
    assert "refused user 'controller'" in text and rs.PASSWORD_ENV in text, text
    assert "not-the-password-4711" not in text, "the password must not be printed"


def test_controller_run_with_the_replicas_credential_says_so(users):
    code, text = controller_run(users["replica"], "ctl-as-replica")
    assert code != 0
    assert "refused user 'replica' a command" in text and "NOPERM" in text, text


def test_fleet_link_with_a_wrong_password_says_so_once(engine, users, caplog):
    url = rs.with_credentials(users["replica"], password="not-the-password-4711")
    fl = FleetLink(replica(engine), url, MODEL, "r0", score=False)
    with caplog.at_level(logging.ERROR, logger="services.serve.fleet_link"):
        for _ in range(3):  # the link's retries: one message, not one per retry
            assert not fl._guard(fl._poll)
    (message,) = [r.getMessage() for r in caplog.records]
    assert "refused user 'replica'" in message and rs.PASSWORD_ENV in message, message
    assert "not-the-password-4711" not in message
    assert not fl.connected


# -- `selfspec serve`'s own Redis ---------------------------------------------------------


def test_local_fleet_starts_redis_with_the_role_users(tmp_path, monkeypatch):
    """The Redis that `selfspec serve` starts: the same users from an aclfile only its
    owner reads (passwords hashed), replicas and controller each with their own password
    in a file only its owner reads, never in what Ray logs (the app's args and runtime
    env), and the `default` user off, so the gateway, which gets no credential, gets
    nothing."""
    fleet = Fleet(FleetOptions(log_dir=tmp_path), say=lambda _: None)
    fleet._start_redis()
    try:
        passwords = fleet.redis_users
        aclfile = tmp_path / "redis-users.acl"
        assert stat.S_IMODE(aclfile.stat().st_mode) == 0o600
        assert not any(pw in aclfile.read_text() for pw in passwords.values())
        logged = repr(fleet.app)  # Serve logs the args, Ray the runtime env
        assert not any(pw in logged for pw in passwords.values())
        replica_url = fleet.app["args"]["redis_url"]
        replica_env = fleet.app["runtime_env"]["env_vars"]
        assert rs.user_of(replica_url) == "replica"
        assert stat.S_IMODE(os.stat(replica_env[rs.PASSWORD_FILE_ENV]).st_mode) == 0o600
        monkeypatch.setenv(rs.PASSWORD_ENV, "a stale one from the shell")  # the file wins
        with monkeypatch.context() as env:
            for name, value in replica_env.items():
                env.setenv(name, value)
            as_replica = rs.connect(replica_url)
            assert as_replica.xadd(rs.TELEMETRY, telemetry_fields())
            with pytest.raises(redis.exceptions.NoPermissionError):
                as_replica.set(rs.model_key(MODEL, "current"), record().to_json())
        with monkeypatch.context() as env:
            for name, value in fleet.redis_password_env("controller").items():
                env.setenv(name, value)
            as_controller = rs.connect(fleet.redis_role_url("controller"))
            assert as_controller.set(rs.model_key(MODEL, "current"), record().to_json())
        monkeypatch.delenv(rs.PASSWORD_ENV)
        with pytest.raises(redis.AuthenticationError):
            rs.connect(fleet.redis_url).get(rs.model_key(MODEL, "current"))
    finally:
        fleet.stop()


def test_a_password_file_that_cannot_be_read_is_named(tmp_path, monkeypatch):
    monkeypatch.setenv(rs.PASSWORD_FILE_ENV, str(tmp_path / "missing"))
    with pytest.raises(ValueError, match=rs.PASSWORD_FILE_ENV):
        rs.connect("redis://replica@127.0.0.1:1/0")
