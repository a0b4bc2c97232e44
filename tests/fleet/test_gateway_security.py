"""The gateway's side of the fleet's trust, without a fleet: a real gateway on loopback in
front of a fake Serve proxy that records what reaches it. The internal credential on every
call upstream, Abort only by the caller that started the stream, the refusal to take a
bearer token in plaintext, a server certificate replaced on disk and served to the next
connection, and TLS to the upstream."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import socket
import ssl

import grpc
import pytest
from certs import self_signed
from fleet_helpers import chat

from services.common import internal_auth
from services.common.addresses import is_loopback
from services.common.tokens import TokenSource
from services.gateway import main as gateway_main
from services.gateway.server import (
    Gateway,
    GatewayConfig,
    GatewayServer,
    Upstream,
)
from services.gen.selfspec.v1 import generation_pb2 as pb
from services.gen.selfspec.v1 import generation_pb2_grpc as pb_grpc

Code = grpc.StatusCode
SECRET = "fleet-secret"
# Each channel on its own connection: gRPC shares connections between a process's channels
# to the same address, and an owner without a token is its connection.
OWN_CONNECTION = [("grpc.use_local_subchannel_pool", 1)]


class RecordingUpstream(pb_grpc.GenerationServicer):
    """Serve's proxy as the gateway sees it, keeping the metadata of every call; each stream
    sends one message and holds until `release` is set."""

    def __init__(self) -> None:
        self.seen: list[dict[str, str]] = []
        self.release = asyncio.Event()

    async def GetModelInfo(self, request, context):
        self.seen.append(dict(context.invocation_metadata()))
        return pb.ModelInfo(model="fake")

    async def Generate(self, request, context):
        self.seen.append(dict(context.invocation_metadata()))
        yield pb.GenerateResponse(request_id=request.request_id, text="a", token_ids=[1])
        await self.release.wait()
        yield pb.GenerateResponse(request_id=request.request_id, finish_reason=1)


@contextlib.asynccontextmanager
async def serving(upstream: RecordingUpstream, credentials=None):
    """`upstream` on a loopback port, plaintext or with `credentials`; yields the port."""
    server = grpc.aio.server()
    pb_grpc.add_GenerationServicer_to_server(upstream, server)
    if credentials is None:
        port = server.add_insecure_port("127.0.0.1:0")
    else:
        port = server.add_secure_port("127.0.0.1:0", credentials)
    await server.start()
    try:
        yield port
    finally:
        upstream.release.set()
        await server.stop(None)


@contextlib.asynccontextmanager
async def gateway_before(upstream: RecordingUpstream, credential=None, **config):
    """A real gateway on loopback in front of `upstream`; yields the gateway's address."""
    async with serving(upstream) as port:
        up = Upstream(f"127.0.0.1:{port}", credential=credential)
        server = GatewayServer(GatewayConfig("127.0.0.1:0", up, drain_seconds=0, **config))
        await server.start()
        try:
            yield f"127.0.0.1:{server.port}"
        finally:
            await server.stop()


def generation(channel) -> pb_grpc.GenerationStub:
    return pb_grpc.GenerationStub(channel)


def bearer(token: str) -> list[tuple[str, str]]:
    return [("authorization", f"Bearer {token}")]


# -- the internal credential ------------------------------------------------------------


def test_every_call_upstream_carries_the_internal_credential_never_the_clients(tmp_path):
    secret = tmp_path / "internal"
    secret.write_text(SECRET + "\n")

    async def scenario():
        upstream = RecordingUpstream()
        upstream.release.set()
        credential, tokens = TokenSource(path=str(secret)), TokenSource(value="client-token")
        async with (
            gateway_before(upstream, credential, tokens=tokens) as address,
            grpc.aio.insecure_channel(address) as channel,
        ):
            stub = generation(channel)
            await stub.GenerateUnary(chat("hi", 2), metadata=bearer("client-token"))
            secret.write_text("rotated\n")  # a rotated Secret applies at once
            os.utime(secret, ns=(1, 1))  # a new mtime even on a coarse clock
            await stub.GenerateUnary(chat("hi", 2), metadata=bearer("client-token"))
        start_probe, calls = upstream.seen[0], [md for md in upstream.seen if "request_id" in md]
        assert start_probe[internal_auth.METADATA_KEY] == SECRET
        assert [md[internal_auth.METADATA_KEY] for md in calls] == [SECRET, "rotated"]
        assert all("authorization" not in md for md in upstream.seen)
        assert all(md.get(internal_auth.OWNER_KEY) for md in calls)

    asyncio.run(scenario())


def test_the_credential_is_checked_whole():
    source = TokenSource(value=SECRET)
    assert internal_auth.accepts(source, [(internal_auth.METADATA_KEY, SECRET)])
    for sent in ([], [(internal_auth.METADATA_KEY, "")], [(internal_auth.METADATA_KEY, "fleet")]):
        assert not internal_auth.accepts(source, sent)
    # The client's bearer header is not the internal credential, even with its value.
    assert not internal_auth.accepts(source, [("authorization", SECRET)])


def test_a_new_secret_is_readable_by_its_owner_alone(tmp_path):
    path = tmp_path / "internal-token"
    path.write_text("old")
    path.chmod(0o644)  # left by an earlier run
    value = internal_auth.write_new(path)
    assert path.stat().st_mode & 0o777 == 0o600 and len(value) >= 32
    assert internal_auth.from_env(str(path)).current() == value
    assert internal_auth.write_new(path) != value


# -- Abort owns its request -------------------------------------------------------------


def test_only_the_token_that_started_a_stream_can_abort_it():
    async def scenario():
        upstream = RecordingUpstream()
        async with (
            gateway_before(upstream) as address,
            grpc.aio.insecure_channel(address) as channel,
        ):
            stub = generation(channel)
            a = stub.Generate(chat("a", 8, request_id="a-1"), metadata=bearer("a"))
            b = stub.Generate(chat("b", 8, request_id="b-1"), metadata=bearer("b"))
            await a.read(), await b.read()  # both streaming
            abort = pb.AbortRequest(request_id="a-1")
            assert not (await stub.Abort(abort, metadata=bearer("b"))).found
            assert not (await stub.Abort(abort)).found  # no credential, no request
            # B can abort its own, so its Abort above was judged, not lost.
            own = pb.AbortRequest(request_id="b-1")
            assert (await stub.Abort(own, metadata=bearer("b"))).found
            assert (await b.read()).finish_reason == pb.FINISH_REASON_ABORT
            # A's stream went on, untouched, to its own end.
            upstream.release.set()
            assert (await a.read()).finish_reason == pb.FINISH_REASON_STOP
            assert await a.code() == Code.OK
            # And A, from another connection, can abort its next stream.
            upstream.release.clear()
            again = stub.Generate(chat("a", 8, request_id="a-2"), metadata=bearer("a"))
            await again.read()
            async with grpc.aio.insecure_channel(address, OWN_CONNECTION) as other:
                abort = pb.AbortRequest(request_id="a-2")
                assert (await generation(other).Abort(abort, metadata=bearer("a"))).found
            assert (await again.read()).finish_reason == pb.FINISH_REASON_ABORT
        calls = [md for md in upstream.seen if "request_id" in md]
        owners = {md["request_id"]: md[internal_auth.OWNER_KEY] for md in calls}
        assert owners["a-1"] == owners["a-2"] != owners["b-1"]  # the replica is told the owner
        assert len(owners["a-1"]) == 64 and "Bearer" not in owners["a-1"]  # a digest

    asyncio.run(scenario())


class FinishThenHold(RecordingUpstream):
    """Sends a stream's last response, then holds the stream open until `release`, as a
    replica may between its final message and the stream's end."""

    async def Generate(self, request, context):
        yield pb.GenerateResponse(request_id=request.request_id, token_ids=[1], finish_reason=1)
        await self.release.wait()


def test_an_abort_after_the_last_response_finds_nothing():
    """Found by the engine fuzz test: an Abort that came after a stream's final response
    (STOP) but before its end made the gateway send a second final response (ABORT)."""

    async def scenario():
        upstream = FinishThenHold()
        async with (
            gateway_before(upstream) as address,
            grpc.aio.insecure_channel(address) as channel,
        ):
            stub = generation(channel)
            call = stub.Generate(chat("a", 8, request_id="done-1"))
            assert (await call.read()).finish_reason == pb.FINISH_REASON_STOP
            assert not (await stub.Abort(pb.AbortRequest(request_id="done-1"))).found
            upstream.release.set()
            assert await call.read() is grpc.aio.EOF  # one final response, not two
            assert await call.code() == Code.OK

    asyncio.run(scenario())


def test_without_a_token_a_stream_belongs_to_its_connection():
    async def scenario():
        upstream = RecordingUpstream()
        async with (
            gateway_before(upstream) as address,
            grpc.aio.insecure_channel(address, OWN_CONNECTION) as mine,
            grpc.aio.insecure_channel(address, OWN_CONNECTION) as theirs,
        ):
            call = generation(mine).Generate(chat("a", 8, request_id="r"))
            await call.read()
            abort = pb.AbortRequest(request_id="r")
            assert not (await generation(theirs).Abort(abort)).found
            assert (await generation(mine).Abort(abort)).found
            assert (await call.read()).finish_reason == pb.FINISH_REASON_ABORT

    asyncio.run(scenario())


# -- no bearer token in plaintext ---------------------------------------------------------


@pytest.mark.parametrize(
    "listen,loopback",
    [
        ("127.0.0.1:50051", True),
        ("127.0.0.2:50051", True),
        ("localhost:50051", True),
        ("[::1]:50051", True),
        ("0.0.0.0:50051", False),
        ("[::]:50051", False),
        (":50051", False),
        ("10.0.0.7:50051", False),
        ("gateway.example:50051", False),
    ],
)
def test_loopback_addresses(listen, loopback):
    assert is_loopback(listen) is loopback


def test_a_token_without_tls_beyond_loopback_is_refused_and_says_what_to_pass():
    tokens = TokenSource(value="t")
    with pytest.raises(ValueError, match="--allow-insecure-token") as refused:
        GatewayConfig("0.0.0.0:50051", tokens=tokens)
    assert "plaintext" in str(refused.value) and "--tls-cert" in str(refused.value)
    GatewayConfig("0.0.0.0:50051", tokens=tokens, allow_insecure_token=True)
    GatewayConfig("0.0.0.0:50051", tokens=tokens, tls_cert="c", tls_key="k")
    GatewayConfig("127.0.0.1:50051", tokens=tokens)
    GatewayConfig("0.0.0.0:50051")  # no token to leak


def test_the_http_api_takes_no_token_in_plaintext_beyond_loopback_either():
    tokens = TokenSource(value="t")
    with pytest.raises(ValueError, match="plaintext on 0.0.0.0:8000"):
        GatewayConfig("127.0.0.1:50051", tokens=tokens, http_listen="0.0.0.0:8000")
    GatewayConfig("127.0.0.1:50051", tokens=tokens, http_listen="127.0.0.1:8000")
    GatewayConfig("127.0.0.1:50051", tokens=tokens, http_listen="0.0.0.0:8000", tls_cert="c")


def test_selfspec_gateway_refuses_to_start_with_a_token_in_plaintext(monkeypatch, capsys):
    monkeypatch.setenv("SELFSPEC_TOKEN", "t")
    monkeypatch.delenv("SELFSPEC_TOKEN_FILE", raising=False)
    assert gateway_main.main(["--listen", "0.0.0.0:0"]) == 2
    error = capsys.readouterr().err
    assert "bearer token in plaintext on 0.0.0.0:0" in error and "--allow-insecure-token" in error


# -- TLS --------------------------------------------------------------------------------


def der(cert) -> bytes:
    return ssl.PEM_cert_to_DER_cert(cert.read_text())


def served_certificate(port: int) -> bytes:
    """The certificate a new TLS connection to the port is shown."""
    context = ssl.create_default_context()
    context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
    context.set_alpn_protocols(["h2"])
    raw = socket.create_connection(("127.0.0.1", port), timeout=10)
    with context.wrap_socket(raw, server_hostname="localhost") as conn:
        return conn.getpeercert(binary_form=True)


def test_a_certificate_replaced_on_disk_is_served_to_new_connections(tmp_path):
    a_cert, a_key = self_signed(tmp_path, "a")
    b_cert, b_key = self_signed(tmp_path, "b")
    cert, key = tmp_path / "tls.crt", tmp_path / "tls.key"
    shutil.copy(a_cert, cert)
    shutil.copy(a_key, key)

    async def scenario():
        upstream = RecordingUpstream()
        upstream.release.set()
        async with gateway_before(upstream, tls_cert=str(cert), tls_key=str(key)) as address:
            port = int(address.rsplit(":", 1)[1])
            assert await asyncio.to_thread(served_certificate, port) == der(a_cert)
            # Half a rotation (the new certificate beside the old key) is not served.
            shutil.copy(b_cert, cert)
            assert await asyncio.to_thread(served_certificate, port) == der(a_cert)
            shutil.copy(b_key, key)
            assert await asyncio.to_thread(served_certificate, port) == der(b_cert)
            # And gRPC clients that trust only the new certificate are served.
            trust = grpc.ssl_channel_credentials(b_cert.read_bytes())
            async with grpc.aio.secure_channel(address, trust) as channel:
                reply = await generation(channel).GenerateUnary(chat("hi", 2), timeout=30)
                assert reply.finish_reason == pb.FINISH_REASON_STOP

    asyncio.run(scenario())


def test_a_key_that_is_not_the_certificates_is_refused_at_start(tmp_path):
    a_cert, _ = self_signed(tmp_path, "a")
    _, b_key = self_signed(tmp_path, "b")
    config = GatewayConfig("127.0.0.1:0", tls_cert=str(a_cert), tls_key=str(b_key))

    async def start():
        GatewayServer(config)

    with pytest.raises(ValueError, match="cannot load the TLS certificate .* with the key"):
        asyncio.run(start())


def test_tls_to_the_upstream_verifies_its_certificate(tmp_path):
    cert, key = self_signed(tmp_path, "serve", ("serve.selfspec.internal",))

    async def ready(upstream: Upstream) -> bool:
        gw = Gateway(upstream)
        try:
            return await gw.probe()
        finally:
            await gw.close()

    async def scenario():
        upstream = RecordingUpstream()
        credentials = grpc.ssl_server_credentials([(key.read_bytes(), cert.read_bytes())])
        async with serving(upstream, credentials) as port:
            address = f"127.0.0.1:{port}"
            name = "serve.selfspec.internal"
            assert await ready(Upstream(address, tls_ca=str(cert), server_name=name))
            # The certificate does not name 127.0.0.1: without the override it is refused,
            assert not await ready(Upstream(address, tls_ca=str(cert)))
            # and a plaintext gateway gets nothing from a TLS upstream.
            assert not await ready(Upstream(address))
        assert upstream.seen  # the verified calls reached it

    asyncio.run(scenario())
