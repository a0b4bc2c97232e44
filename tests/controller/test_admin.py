"""`selfspec controller status|history|pin|unpin|rollback` against a controller process,
over real gRPC on loopback; health and reflection are served beside the admin API."""

from __future__ import annotations

import json

import grpc
import pytest
from controller_helpers import add_replica, kill, spawn_controller
from grpc_health.v1 import health_pb2, health_pb2_grpc
from waiting import wait_for

from services.common import redis_schema as rs
from services.controller.main import main
from services.controller.store import ConfigStore
from services.serve.local import free_port

MODEL = "m"


def record(max_draft: int) -> rs.Record:
    draft = {"mode": "skip", "skip_attn": [8, 26], "skip_mlp": [], "max_draft": max_draft}
    return rs.Record(MODEL, draft, reason="test", by="seed")


@pytest.fixture
def admin(redis_server):
    client = redis_server.client()
    add_replica(client, MODEL, "r1")
    store = ConfigStore(client)
    for k in (2, 3):
        store.publish(record(k), None)
    address = f"127.0.0.1:{free_port()}"
    proc = spawn_controller(redis_server.url, "ctl-cli", address, "--no-search")
    try:
        with grpc.insecure_channel(address) as channel:
            health = health_pb2_grpc.HealthStub(channel)
            wait_for(lambda: _serving(health), what="the admin server")
        wait_for(lambda: client.get(rs.LEASE), what="the lease")
        yield address, client
    finally:
        kill(proc)


def _serving(stub) -> bool:
    try:
        reply = stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=1)
        return reply.status == health_pb2.HealthCheckResponse.SERVING
    except grpc.RpcError:
        return False


def run(capsys, *argv: str) -> tuple[int, str]:
    code = main(list(argv))
    out = capsys.readouterr()
    return code, out.out + out.err


def test_status_pin_rollback_over_grpc(admin, capsys):
    address, client = admin
    code, out = run(capsys, "status", "--json", "--admin", address)
    assert code == 0
    status = json.loads(out)
    assert status["leader_id"] == "ctl-cli" and status["is_leader"]
    assert status["current_version"] == 2
    assert status["record"]["version"] == 2 and status["record"]["draft"]["max_draft"] == 3
    assert "r1" in status["models"][MODEL]["replicas"]

    code, out = run(capsys, "pin", "1", "--admin", address)
    assert code == 0 and "version 3 republishes version 1" in out
    current = rs.Record.parse(client.get(rs.model_key(MODEL, "current")))
    assert current.version == 3 and current.draft["max_draft"] == 2 and current.reason == "pin"
    status = json.loads(run(capsys, "status", "--json", "--admin", address)[1])
    assert status["models"][MODEL]["pinned_version"] == 3 and status["current_version"] == 3

    code, out = run(capsys, "rollback", "--admin", address)
    assert code == 0 and "republishes version 2" in out  # the config before the pinned one
    current = rs.Record.parse(client.get(rs.model_key(MODEL, "current")))
    assert current.version == 4 and current.draft["max_draft"] == 3

    code, out = run(capsys, "history", "--admin", address)
    assert code == 0 and [int(line.split()[0]) for line in out.splitlines()] == [4, 3, 2, 1]
    code, out = run(capsys, "status", "--admin", address)
    assert code == 0 and "leader: ctl-cli" in out and "version 4 (rollback" in out
    assert run(capsys, "unpin", "--admin", address)[0] == 0
    assert client.get(rs.model_key(MODEL, "pin")) is None


def test_errors_say_what_to_do(admin, capsys):
    address, _ = admin
    code, out = run(capsys, "pin", "99", "--admin", address)
    assert code == 1 and "no version 99" in out
    code, out = run(capsys, "status", "--admin", f"127.0.0.1:{free_port()}")
    assert code == 1 and "selfspec controller run" in out and "--admin" in out


def test_run_names_an_unreachable_redis(capsys):
    url = f"redis://127.0.0.1:{free_port()}/0"
    code, out = run(capsys, "run", "--redis-url", url, "--wait-redis", "0")
    assert code == 2 and url in out and "redis-server --port" in out
