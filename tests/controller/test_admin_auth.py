"""The admin API's credentials, against a controller process over real gRPC on loopback:
an operator token may write, a read-only token may only read, no token gets nothing but
health; the token files are re-read when they change; the CLI sends them; TLS."""

from __future__ import annotations

import json
import os
from pathlib import Path

import grpc
import pytest
from certs import self_signed
from controller_helpers import add_replica, kill, spawn_controller
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from waiting import wait_for

from services.common import redis_schema as rs
from services.controller.main import main
from services.controller.store import ConfigStore
from services.gen.selfspec.v1 import controller_pb2 as pb
from services.gen.selfspec.v1 import controller_pb2_grpc as pb_grpc
from services.serve.local import free_port

MODEL = "m"
ENV = (
    "SELFSPEC_ADMIN_TOKEN_FILE",
    "SELFSPEC_ADMIN_TOKEN",
    "SELFSPEC_ADMIN_READ_TOKEN_FILE",
    "SELFSPEC_ADMIN_READ_TOKEN",
)


@pytest.fixture(autouse=True)
def no_token_in_env(monkeypatch):
    """Tokens come only from what each test passes, not from the shell that runs it."""
    for name in ENV:
        monkeypatch.delenv(name, raising=False)


class Secured:
    """A controller whose admin API takes the tokens in two files."""

    def __init__(self, redis_server, folder: Path, *extra: str) -> None:
        self.client = redis_server.client()
        add_replica(self.client, MODEL, "r1")
        store = ConfigStore(self.client)
        for k in (2, 3):
            draft = {"mode": "skip", "skip_attn": [8, 26], "skip_mlp": [], "max_draft": k}
            store.publish(rs.Record(MODEL, draft, reason="test", by="seed"), None)
        self.operator = folder / "token"
        self.reader = folder / "read-token"
        self.operator.write_text("operator-1\n")
        self.reader.write_text("reader-1\n")
        self.address = f"127.0.0.1:{free_port()}"
        files = ["--admin-token-file", str(self.operator)]
        files += ["--admin-read-token-file", str(self.reader)]
        self.proc = spawn_controller(
            redis_server.url, "ctl-auth", self.address, "--no-search", *files, *extra
        )

    def current_version(self) -> int:
        return rs.Record.parse(self.client.get(rs.model_key(MODEL, "current"))).version


@pytest.fixture
def secured(redis_server, tmp_path):
    ctl = Secured(redis_server, tmp_path)
    try:
        with grpc.insecure_channel(ctl.address) as channel:
            wait_for(lambda: _serving(channel), what="the admin server")
        yield ctl
    finally:
        kill(ctl.proc)


def _serving(channel: grpc.Channel) -> bool:
    """Health answers with no token: Kubernetes' probes send none."""
    try:
        reply = health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service=""), timeout=1
        )
        return reply.status == health_pb2.HealthCheckResponse.SERVING
    except grpc.RpcError:
        return False


def bearer(token: str | None) -> list[tuple[str, str]]:
    return [("authorization", f"Bearer {token}")] if token is not None else []


def code_of(call, *args, **kwargs) -> grpc.StatusCode:
    try:
        call(*args, timeout=10, **kwargs)
    except grpc.RpcError as exc:
        return exc.code()
    return grpc.StatusCode.OK


def rewrite(path: Path, data: str | bytes) -> None:
    """New contents with a later mtime, however coarse the file system's clock."""
    before = path.stat().st_mtime_ns
    path.write_bytes(data.encode() if isinstance(data, str) else data)
    os.utime(path, ns=(before + 1_000_000_000, before + 1_000_000_000))


def test_the_operator_writes_the_reader_reads_nobody_else(secured):
    with grpc.insecure_channel(secured.address) as channel:
        stub = pb_grpc.ControllerAdminStub(channel)
        pin = pb.PinRequest(version=1)
        for token in (None, "", "operator-2", "reader-1x"):
            assert code_of(stub.Pin, pin, metadata=bearer(token)) == grpc.StatusCode.UNAUTHENTICATED
            status = code_of(stub.GetStatus, pb.GetStatusRequest(), metadata=bearer(token))
            assert status == grpc.StatusCode.UNAUTHENTICATED
        assert code_of(stub.Pin, pin, metadata=[("authorization", "operator-1")]) == (
            grpc.StatusCode.UNAUTHENTICATED  # the token without its scheme
        )

        read = bearer("reader-1")
        status = stub.GetStatus(pb.GetStatusRequest(), metadata=read, timeout=10)
        assert status.current_version == 2 and status.models[0].model == MODEL
        history = stub.ListHistory(pb.ListHistoryRequest(), metadata=read, timeout=10)
        assert [r.version for r in history.records] == [2, 1]
        denied = grpc.StatusCode.PERMISSION_DENIED
        assert code_of(stub.Pin, pin, metadata=read) == denied
        assert code_of(stub.Unpin, pb.UnpinRequest(), metadata=read) == denied
        assert code_of(stub.Rollback, pb.RollbackRequest(), metadata=read) == denied
        assert secured.current_version() == 2  # nothing refused reached Redis

        write = bearer("operator-1")
        assert stub.Pin(pin, metadata=write, timeout=10).record.version == 3
        assert secured.current_version() == 3
        status = stub.GetStatus(pb.GetStatusRequest(), metadata=write, timeout=10)
        assert status.models[0].pinned_version == 3  # the operator may read too
        assert _serving(channel)


def test_reflection_needs_a_token(secured):
    def services(metadata) -> list[str] | grpc.StatusCode:
        with grpc.insecure_channel(secured.address) as channel:
            stub = reflection_pb2_grpc.ServerReflectionStub(channel)
            ask = iter([reflection_pb2.ServerReflectionRequest(list_services="")])
            try:
                reply = next(iter(stub.ServerReflectionInfo(ask, metadata=metadata, timeout=10)))
            except grpc.RpcError as exc:
                return exc.code()
            return [s.name for s in reply.list_services_response.service]

    assert services(bearer(None)) == grpc.StatusCode.UNAUTHENTICATED
    assert "selfspec.v1.ControllerAdmin" in services(bearer("reader-1"))


def test_a_rotated_token_applies_without_a_restart(secured):
    with grpc.insecure_channel(secured.address) as channel:
        stub = pb_grpc.ControllerAdminStub(channel)
        unpin = pb.UnpinRequest()
        assert code_of(stub.Unpin, unpin, metadata=bearer("operator-1")) == grpc.StatusCode.OK

        rewrite(secured.operator, "operator-2\n")
        assert code_of(stub.Unpin, unpin, metadata=bearer("operator-1")) == (
            grpc.StatusCode.UNAUTHENTICATED
        )
        assert code_of(stub.Unpin, unpin, metadata=bearer("operator-2")) == grpc.StatusCode.OK

        # A file emptied mid-rotation lets nobody in, and says whose fault it is.
        rewrite(secured.operator, "")
        assert code_of(stub.Unpin, unpin, metadata=bearer("operator-2")) == (
            grpc.StatusCode.UNAVAILABLE
        )
        rewrite(secured.operator, "operator-3")
        assert code_of(stub.Unpin, unpin, metadata=bearer("operator-3")) == grpc.StatusCode.OK

        rewrite(secured.reader, "reader-2")
        status = pb.GetStatusRequest()
        assert code_of(stub.GetStatus, status, metadata=bearer("reader-1")) == (
            grpc.StatusCode.UNAUTHENTICATED
        )
        assert code_of(stub.GetStatus, status, metadata=bearer("reader-2")) == grpc.StatusCode.OK


def run(capsys, *argv: str) -> tuple[int, str]:
    code = main(list(argv))
    out = capsys.readouterr()
    return code, out.out + out.err


def test_the_cli_reads_its_token_from_a_file(secured, capsys, monkeypatch, tmp_path):
    at = ("--admin", secured.address)
    code, out = run(capsys, "status", *at)
    assert code == 1
    assert "needs a token: pass --token-file or set SELFSPEC_ADMIN_TOKEN_FILE" in out

    code, out = run(capsys, "status", "--json", "--token-file", str(secured.reader), *at)
    assert code == 0 and json.loads(out)["current_version"] == 2
    code, out = run(capsys, "pin", "1", "--token-file", str(secured.reader), *at)
    assert code == 1 and "this token may only read; pin/unpin/rollback need the operator" in out
    assert secured.current_version() == 2

    code, out = run(capsys, "pin", "1", "--token-file", str(secured.operator), *at)
    assert code == 0 and "version 3 republishes version 1" in out
    assert secured.current_version() == 3

    monkeypatch.setenv("SELFSPEC_ADMIN_TOKEN_FILE", str(secured.operator))
    code, out = run(capsys, "rollback", *at)
    assert code == 0 and secured.current_version() == 4
    monkeypatch.delenv("SELFSPEC_ADMIN_TOKEN_FILE")
    monkeypatch.setenv("SELFSPEC_ADMIN_TOKEN", "reader-1")  # a value, not a file
    assert run(capsys, "history", *at)[0] == 0
    monkeypatch.setenv("SELFSPEC_ADMIN_TOKEN", "guessed")
    code, out = run(capsys, "history", *at)
    assert code == 1 and "refused this token" in out

    code, out = run(capsys, "status", "--token-file", str(tmp_path / "absent"), *at)
    assert code == 2 and "absent" in out


@pytest.mark.parametrize("listen", ["0.0.0.0", "[::]", "10.1.2.3"])
def test_no_token_on_a_public_address_refuses_to_start(capsys, listen):
    redis = ("--redis-url", f"redis://127.0.0.1:{free_port()}/0", "--wait-redis", "0")
    code, out = run(capsys, "run", "--admin-listen", f"{listen}:{free_port()}", *redis)
    assert code == 2 and "refusing to serve the admin API" in out
    assert "--admin-token-file" in out and "SELFSPEC_ADMIN_TOKEN_FILE" in out


def test_what_may_start_starts_and_says_what_is_open(capsys, caplog, tmp_path, monkeypatch):
    """Each of these gets past the admin checks to Redis (absent here: exit 2 naming it),
    and warns where the admin API is open or its tokens travel in clear text."""
    redis = ("--redis-url", f"redis://127.0.0.1:{free_port()}/0", "--wait-redis", "0")

    def starts(*argv: str) -> str:
        caplog.clear()
        code, out = run(capsys, "run", *argv, *redis)
        assert code == 2 and "cannot reach Redis" in out, out
        return caplog.text

    public = ("--admin-listen", f"0.0.0.0:{free_port()}")
    assert "--allow-insecure-admin" in starts(*public, "--allow-insecure-admin")
    assert "unauthenticated" in starts("--admin-listen", f"127.0.0.1:{free_port()}")
    token = tmp_path / "token"
    token.write_text("t")
    assert "clear text" in starts(*public, "--admin-token-file", str(token))
    monkeypatch.setenv("SELFSPEC_ADMIN_TOKEN", "t")
    assert "unauthenticated" not in starts(*public)

    monkeypatch.delenv("SELFSPEC_ADMIN_TOKEN")
    monkeypatch.setenv("SELFSPEC_ADMIN_READ_TOKEN", "r")
    code, out = run(capsys, "run", *redis)
    assert code == 2 and "needs an operator token beside it" in out


def test_tls_needs_the_ca_and_reloads_a_replaced_certificate(redis_server, tmp_path, capsys):
    cert, key = self_signed(tmp_path, "first", ("127.0.0.1", "localhost"))
    served_cert, served_key = tmp_path / "tls.crt", tmp_path / "tls.key"
    served_cert.write_bytes(cert.read_bytes())
    served_key.write_bytes(key.read_bytes())
    tls = ("--admin-tls-cert", str(served_cert), "--admin-tls-key", str(served_key))
    ctl = Secured(redis_server, tmp_path, *tls)
    try:
        at = ("--admin", ctl.address, "--token-file", str(ctl.operator))
        wait_for(
            lambda: run(capsys, "status", *at, "--tls-ca", str(cert))[0] == 0,
            what="the admin server on TLS",
        )
        code, out = run(capsys, "status", "--json", *at, "--tls-ca", str(cert))
        assert code == 0 and json.loads(out)["current_version"] == 2
        code, out = run(capsys, "status", *at)  # plaintext to a TLS server
        assert code == 1 and "pass --tls-ca" in out

        # The next certificate names the controller only by a DNS name.
        second, second_key = self_signed(tmp_path, "second", ("selfspec-controller",))
        code, out = run(capsys, "status", *at, "--tls-ca", str(second))
        assert code == 1 and "check that --tls-ca" in out  # not yet served
        rewrite(served_key, second_key.read_bytes())
        rewrite(served_cert, second.read_bytes())
        named = ("--tls-ca", str(second), "--tls-server-name", "selfspec-controller")
        code, out = run(capsys, "pin", "1", *at, *named)
        assert code == 0 and "republishes version 1" in out
        assert run(capsys, "status", *at, "--tls-ca", str(cert))[0] == 1
        assert run(capsys, "status", *at, "--tls-ca", str(second))[0] == 1  # name differs
    finally:
        kill(ctl.proc)
