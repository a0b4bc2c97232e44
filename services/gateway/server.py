"""The gateway: the fleet's front door for `selfspec.v1.Generation`.

Stateless. Each call is authenticated (see `auth`), parsed and validated before it
costs anything upstream, then forwarded to Serve's gRPC proxy, which routes it to an
engine replica. Streams pass through message by message. Failures come back with the
status a client can act on; a replica lost before any output is retried on another.
A client that cancels, or whose deadline passes, cancels the upstream call, and the
replica frees the request's KV blocks. The gateway is ready (health SERVING) while an
engine replica answers; while none does it refuses calls at once with UNAVAILABLE, rather
than leaving them queued in Serve's proxy until their deadlines.

Back-pressure: a gateway forwards at most `max_in_flight` generation calls at once and
refuses the next at once with RESOURCE_EXHAUSTED. A fleet that is full (Serve's queue, or
an engine's) refuses with RESOURCE_EXHAUSTED too, which the gateway passes on without
retrying: another attempt would only add load where there is no room. Every such refusal
says to retry later and carries the delay in its trailing metadata, as `retry-after-ms`
and as gRPC's own `grpc-retry-pushback-ms` (which a client's gRPC retry policy obeys).

When tracing is on (`services.common.telemetry`) each generation call gets a `gen_ai.*`
span, continuing a `traceparent` the client sent, and passes its own `traceparent`
upstream in the gRPC metadata.

Trust: every call upstream carries the fleet's internal credential
(`services.common.internal_auth`), without which Serve's replicas refuse it, over TLS when
`Upstream.tls_ca` is set. A call belongs to its caller: only the credential that started a
stream (its bearer token, or without one its connection) can abort it; another caller's
Abort finds nothing. A bearer token is not served in plaintext on a non-loopback address
unless `allow_insecure_token` says so; the server certificate is re-read when its files
change (`tls`).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import logging
import os
import random
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field

import grpc
from google.protobuf.message import DecodeError
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from services.common import api, internal_auth, telemetry, tls
from services.common.addresses import is_loopback
from services.common.grpc_ports import EXCLUSIVE, add_port
from services.common.tokens import TokenSource
from services.gateway import metrics
from services.gateway.auth import AuthInterceptor
from services.gen.selfspec.v1 import generation_pb2 as pb
from services.gen.selfspec.v1 import generation_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)

SERVICE = "selfspec.v1.Generation"
LIVENESS = "liveness"  # the health service name that only says the process runs
MAX_MESSAGE_BYTES = 8 << 20  # a prompt of MAX_PROMPT_CHARS in UTF-8, with room to spare
CHANNEL_OPTIONS = [
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
]
SERVER_OPTIONS = [*CHANNEL_OPTIONS, *EXCLUSIVE]  # a port another process holds is refused
# Find a Serve proxy that comes (back) up within seconds, not after gRPC's 2-minute backoff.
UPSTREAM_OPTIONS = [*CHANNEL_OPTIONS, ("grpc.max_reconnect_backoff_ms", 5000)]
RETRIES = 2  # extra attempts when a replica fails before sending anything
RETRY_BACKOFF_S = 0.5
# Ray reports a replica lost mid-call as INTERNAL with one of these in the details.
REPLICA_LOST = ("ActorDiedError", "RayActorError", "ActorUnavailableError", "actor died")
# Readiness: Serve's proxy queues a call while no replica runs, so the gateway asks one
# itself, with a cheap GetModelInfo, every PROBE_PERIOD_S.
PROBE_PERIOD_S = 1.0
PROBE_TIMEOUT_S = 2.0
PROBE_MISSES = 2  # probes in a row that no replica answered before the gateway is not ready
# Back-pressure: generation calls one gateway forwards at once; past it, refused at once.
MAX_IN_FLIGHT = 1024
RETRY_AFTER_MS = 1000  # the retry hint of a refusal for want of room; jittered, see below
RETRY_AFTER_KEYS = ("retry-after-ms", "grpc-retry-pushback-ms")
# gRPC's own RESOURCE_EXHAUSTED for a message over a size limit: no room will ever fit it.
TOO_LARGE = "larger than max"
PASS_THROUGH = {
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.UNAVAILABLE,
    grpc.StatusCode.DEADLINE_EXCEEDED,
    grpc.StatusCode.CANCELLED,
}


@dataclass
class Upstream:
    """Where Serve's gRPC proxy listens, the application to call there, and how to reach
    it: the internal credential to send, and TLS when a CA to verify it by is given."""

    address: str = "127.0.0.1:9000"
    app: str = "selfspec"
    credential: TokenSource | None = None  # the fleet's internal credential
    tls_ca: str | None = None  # PEM CA certificates: speak TLS, and verify the proxy by them
    server_name: str | None = None  # the name its certificate must carry, if not the host's

    def channel(self) -> grpc.aio.Channel:
        if not self.tls_ca:
            return grpc.aio.insecure_channel(self.address, options=UPSTREAM_OPTIONS)
        options = list(UPSTREAM_OPTIONS)
        if self.server_name:
            options.append(("grpc.ssl_target_name_override", self.server_name))
        credentials = tls.channel_credentials(self.tls_ca)
        return grpc.aio.secure_channel(self.address, credentials, options=options)


@dataclass
class Limits:
    """A gateway's back-pressure: calls in flight, and the retry hint of a refusal."""

    max_in_flight: int = MAX_IN_FLIGHT
    retry_after_ms: int = RETRY_AFTER_MS

    def __post_init__(self) -> None:
        if self.max_in_flight < 1 or self.retry_after_ms < 0:
            raise ValueError("max_in_flight must be at least 1 and retry_after_ms at least 0")

    def retry_after(self) -> int:
        """The hint, spread over [1, 1.5) times the setting: clients that were refused
        together do not all come back together (gRPC's pushback replaces its own jitter)."""
        return int(self.retry_after_ms * (1 + random.random() / 2))


class _Choices:
    """The `n` choices of one stream: the latest response of each, and which finished."""

    def __init__(self, n: int) -> None:
        self.n = n
        self.latest: dict[int, pb.GenerateResponse] = {}
        self.done: set[int] = set()

    def saw(self, response: pb.GenerateResponse) -> None:
        self.latest[response.index] = response
        if response.finish_reason:
            self.done.add(response.index)

    @property
    def finished(self) -> bool:
        """Every choice's last response is on its way: too late to abort."""
        return len(self.done) == self.n

    def usage(self, index: int) -> pb.Usage:
        latest = self.latest.get(index)
        return pb.Usage() if latest is None else latest.usage

    def summary(self) -> pb.GenerateResponse | None:
        """The stream as one response, for metrics and tracing: the choices' usage together
        (`api.summed_usage`), finished when every choice has."""
        if not self.latest:
            return None
        whole = pb.GenerateResponse()
        whole.CopyFrom(self.latest[min(self.latest)])
        whole.usage.CopyFrom(api.summed_usage([self.latest[i].usage for i in sorted(self.latest)]))
        if not self.finished:
            whole.finish_reason = pb.FINISH_REASON_UNSPECIFIED
        return whole


@dataclass
class _Call:
    """A stream in flight, so that `Abort` can find and end it."""

    choices: _Choices
    owner: str = ""  # who may abort it (`Gateway.owner_of`)
    upstream: grpc.aio.Call | None = None
    aborted: bool = False
    span: telemetry.GenerationSpan | None = None  # None when tracing is off


class _Malformed:
    """What a request that does not parse becomes; the method refuses it."""

    def __init__(self, error: Exception) -> None:
        self.error = error


def _parser(message_type):
    def parse(data: bytes):
        try:
            return message_type.FromString(data)
        except (DecodeError, ValueError) as exc:
            return _Malformed(exc)

    return parse


class Gateway:
    """The `Generation` service, forwarding to the fleet."""

    def __init__(self, upstream: Upstream, limits: Limits | None = None) -> None:
        self.upstream = upstream
        self.limits = limits or Limits()
        self.channel = upstream.channel()
        self.stub = pb_grpc.GenerationStub(self.channel)
        self._owner_key = os.urandom(32)  # owners are keyed digests: no token can be guessed
        self._why = ""  # why the last probe found no replica
        self.calls: dict[str, _Call] = {}
        self.draining = False
        self.ready = False  # an engine replica answered lately; see `watch_replicas`
        self._answered = 0.0  # when a replica last sent a call a message (monotonic)
        self.model_info: pb.ModelInfo | None = None  # the last probe's answer

    # -- the service -------------------------------------------------------------------

    async def Generate(self, request, context) -> AsyncIterator[pb.GenerateResponse]:
        request = await self._admit(request, context)
        async for response in self._forward(request, context):
            yield response

    async def GenerateUnary(self, request, context) -> pb.GenerateResponse:
        request = await self._admit(request, context)
        if request.n > 1:  # one reply holds one choice
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT, "n > 1 streams its choices: call Generate"
            )
        whole = pb.GenerateResponse(request_id=request.request_id)
        async for response in self._forward(request, context):
            whole.text += response.text
            whole.token_ids.extend(response.token_ids)
            whole.logprobs.extend(response.logprobs)
            whole.replica_id = response.replica_id or whole.replica_id
            whole.finish_reason = response.finish_reason
            whole.usage.CopyFrom(response.usage)
        return whole

    async def GetModelInfo(self, request, context) -> pb.ModelInfo:
        return await self._ask(self.stub.GetModelInfo, request, context)

    async def Tokenize(self, request, context) -> pb.TokenizeResponse:
        # api.prompt's limits, as for Generate
        return await self._ask(self.stub.Tokenize, request, context, api.prompt)

    async def Detokenize(self, request, context) -> pb.DetokenizeResponse:
        return await self._ask(self.stub.Detokenize, request, context, api.detokenize_ids)

    async def _ask(self, method, request, context, check=None):
        """A unary call forwarded as it is, once the gateway is open and ready, and
        `check(request)` raised no ValueError (INVALID_ARGUMENT)."""
        await self._check_open(request, context)
        if check is not None:
            try:
                check(request)
            except ValueError as exc:
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        await self._check_ready(context)
        try:
            timeout = context.time_remaining()
            return await method(request, metadata=self._metadata(), timeout=timeout)
        except grpc.aio.AioRpcError as err:
            await self._fail(context, *_status(err))

    async def Abort(self, request, context) -> pb.AbortResponse:
        await self._check_open(request, context)
        call = self.calls.get(request.request_id)
        # Another caller's request is as good as none: ids cannot be probed, nor aborted.
        if call is None or not hmac.compare_digest(call.owner, self.owner_of(context)):
            return pb.AbortResponse(found=False)
        if call.choices.finished:  # one final response per choice: they have their own
            return pb.AbortResponse(found=False)
        call.aborted = True
        if call.upstream is not None:
            call.upstream.cancel()
        return pb.AbortResponse(found=True)

    # -----------------------------------------------------------------------------------

    def owner_of(self, context) -> str:
        """Who the caller is, for Abort: a digest of its bearer credential, or, when it sent
        none, of its connection. Callers that share a token share their requests."""
        who = dict(context.invocation_metadata() or ()).get("authorization")
        who = f"token {who}" if who else f"peer {context.peer()}"
        return hmac.new(self._owner_key, who.encode(), hashlib.sha256).hexdigest()

    async def _check_open(self, request, context) -> None:
        if isinstance(request, _Malformed):
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT, f"the request does not parse: {request.error}"
            )
        if self.draining:
            await context.abort(
                grpc.StatusCode.UNAVAILABLE, "this gateway is draining; retry on another"
            )

    async def _check_ready(self, context) -> None:
        if not self.ready:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "no engine replica is ready; retry")

    async def _admit(self, request, context) -> pb.GenerateRequest:
        await self._check_open(request, context)
        await self._check_ready(context)
        try:
            api.validate(request)
        except ValueError as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        if not request.request_id:
            request.request_id = uuid.uuid4().hex
        if request.request_id in self.calls:
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"request_id {request.request_id!r} is already in use",
            )
        # No await between this check and `_forward` taking its slot in `calls`: the
        # limit holds however many calls arrive at once.
        if len(self.calls) >= self.limits.max_in_flight:
            await self._fail(
                context,
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"this gateway is at its limit of {self.limits.max_in_flight} calls in flight",
            )
        return request

    async def _fail(self, context, code: grpc.StatusCode, message: str) -> None:
        """End the call with `code`; a refusal for want of room says when to retry."""
        hint = ()
        if code == grpc.StatusCode.RESOURCE_EXHAUSTED and TOO_LARGE not in message:
            ms = self.limits.retry_after()
            hint = tuple((key, str(ms)) for key in RETRY_AFTER_KEYS)
            message = f"{message}; retry after {ms} ms"
        await context.abort(code, message, trailing_metadata=hint)

    def _metadata(
        self,
        request: pb.GenerateRequest | None = None,
        span: telemetry.GenerationSpan | None = None,
        owner: str = "",
    ) -> list[tuple[str, str]]:
        md = [("application", self.upstream.app), *internal_auth.metadata(self.upstream.credential)]
        if owner:
            md.append((internal_auth.OWNER_KEY, owner))
        if request is not None:
            md.append(("request_id", request.request_id))
            if request.session_id:
                md.append(("session_id", request.session_id))  # the router's affinity key
        if span is not None:
            md.extend(telemetry.metadata_for(span.span))  # Serve's proxy continues the trace
        return md

    def _trace(self, request: pb.GenerateRequest, context) -> telemetry.GenerationSpan | None:
        """The request's span, continuing a trace the client sent in its metadata."""
        if not telemetry.enabled():
            return None
        parent = telemetry.context_from_metadata(context.invocation_metadata())
        return telemetry.GenerationSpan(__name__, request, self.upstream.app, parent=parent)

    async def _forward(self, request: pb.GenerateRequest, context) -> AsyncIterator:
        n = request.n if request.HasField("n") else 1
        call = _Call(_Choices(n), self.owner_of(context), span=self._trace(request, context))
        self.calls[request.request_id] = call
        clock = metrics.RequestClock()
        try:
            for attempt in range(RETRIES + 1):
                sent = False
                call.upstream = self.stub.Generate(
                    request,
                    metadata=self._metadata(request, call.span, call.owner),
                    timeout=context.time_remaining(),
                )
                try:
                    async for response in _read(call):
                        sent = True
                        call.choices.saw(response)
                        self._answered = time.monotonic()
                        clock.saw(response)
                        if call.span is not None:
                            call.span.saw(response)
                        yield response
                except grpc.aio.AioRpcError as err:
                    if call.aborted:
                        break
                    code, message = _status(err)
                    # Only a lost replica is worth another attempt; a full fleet
                    # (RESOURCE_EXHAUSTED) goes back to the client at once, with a hint.
                    if code != grpc.StatusCode.UNAVAILABLE or sent or attempt == RETRIES:
                        _end_span(call, call.choices.summary(), (code, message))
                        await self._fail(context, code, message)
                    log.warning("retrying %s after: %s", request.request_id, message)
                    if call.span is not None:
                        call.span.event("retry", {"selfspec.attempt": attempt + 1})
                    await asyncio.sleep(RETRY_BACKOFF_S * (attempt + 1))
                    continue
                break
            if call.aborted:
                for index in sorted(set(range(n)) - call.choices.done):
                    aborted = pb.GenerateResponse(
                        request_id=request.request_id,
                        index=index,
                        finish_reason=pb.FINISH_REASON_ABORT,
                        usage=call.choices.usage(index),
                    )
                    call.choices.saw(aborted)
                    yield aborted
        finally:
            last = call.choices.summary()  # the stream so far, its choices summed
            clock.finish(last)
            _end_span(call, last, None if last is not None and last.finish_reason else _GONE)
            del self.calls[request.request_id]
            if call.upstream is not None:
                call.upstream.cancel()  # no-op when done; frees the replica's blocks otherwise

    # -- readiness -----------------------------------------------------------------------

    async def probe(self) -> bool:
        """Whether an engine replica answers now. A replica that refuses for a full queue is
        there, and so is one that sent a call a message meanwhile: a busy fleet is ready."""
        started = time.monotonic()
        try:
            self.model_info = await self.stub.GetModelInfo(
                pb.GetModelInfoRequest(), metadata=self._metadata(), timeout=PROBE_TIMEOUT_S
            )
            return True
        except grpc.aio.AioRpcError as err:
            self._why = f"{err.code().name}: {err.details()}"
            if err.code() == grpc.StatusCode.UNAUTHENTICATED:
                log.error(
                    "Serve's replicas refuse this gateway's internal credential (%s): give the "
                    "gateway the fleet's, in %s or %s",
                    err.details(),
                    internal_auth.ENV_FILE,
                    internal_auth.ENV_VALUE,
                )
            return err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED or self._answered >= started

    async def watch_replicas(self, on_change) -> None:
        """Probe forever, keeping `ready` and calling `on_change(ready)` when it changes:
        ready at the first answer, not ready after PROBE_MISSES probes without one."""
        misses = 0
        while True:
            misses = 0 if await self.probe() else misses + 1
            ready = misses == 0 or (self.ready and misses < PROBE_MISSES)
            if ready != self.ready:
                self.ready = ready
                state = "ready" if ready else f"not ready: none answers ({self._why})"
                log.warning("engine replicas %s", state)
                await on_change(ready)
            await asyncio.sleep(PROBE_PERIOD_S)

    # -- draining ------------------------------------------------------------------------

    async def drain(self, seconds: float) -> None:
        """Refuse new calls and wait up to `seconds` for those in flight to finish."""
        self.draining = True
        deadline = time.monotonic() + seconds
        while self.calls and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        if self.calls:
            log.warning("drain: %d calls still running after %.0f s", len(self.calls), seconds)

    async def close(self) -> None:
        await self.channel.close()


_GONE = (grpc.StatusCode.CANCELLED, "the call ended before the reply did")


def _end_span(call: _Call, last: pb.GenerateResponse | None, error: tuple | None) -> None:
    """End the call's span once, with the reply's totals or the error."""
    if call.span is not None:
        call.span.finish(last, error)
        call.span = None


async def _read(call: _Call) -> AsyncIterator[pb.GenerateResponse]:
    """The upstream stream's messages; ends quietly when `Abort` cancelled it."""
    while True:
        try:
            response = await call.upstream.read()
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if call.aborted and task is not None and not task.cancelling():
                return  # our own Abort, not the client going away
            raise
        if response is grpc.aio.EOF:
            return
        yield response


def _status(err: grpc.aio.AioRpcError) -> tuple[grpc.StatusCode, str]:
    """The status to give the client for an upstream failure."""
    code, details = err.code(), err.details() or ""
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED and TOO_LARGE not in details:
        # Serve's queue is full (BackPressureError), or an engine's (QueueFull).
        return code, f"the engine replicas are at capacity ({details or 'no details'})"
    if code in PASS_THROUGH:
        return code, details or f"{code.name.lower()}; retry"
    if code == grpc.StatusCode.INTERNAL and any(s in details for s in REPLICA_LOST):
        return grpc.StatusCode.UNAVAILABLE, "the engine replica serving this request failed; retry"
    if code in (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.UNIMPLEMENTED):
        return grpc.StatusCode.UNAVAILABLE, f"no engine replica is ready ({details}); retry"
    return grpc.StatusCode.INTERNAL, f"upstream failed with {code.name}: {details}"


# -- the server --------------------------------------------------------------------------


@dataclass
class GatewayConfig:
    listen: str = "127.0.0.1:50051"
    upstream: Upstream = field(default_factory=Upstream)
    tokens: TokenSource | None = None
    tls_cert: str | None = None  # re-read, with the key, when either file changes
    tls_key: str | None = None
    health_listen: str | None = None  # a plaintext port with only the health service
    drain_seconds: float = 20.0
    limits: Limits = field(default_factory=Limits)
    # True: serve a bearer token in plaintext beyond loopback (the network encrypts it).
    allow_insecure_token: bool = False
    # The OpenAI-compatible HTTP API (`openai_api`) on this address; None: no HTTP. It
    # shares the token and the TLS files with gRPC.
    http_listen: str | None = None

    def __post_init__(self) -> None:
        if self.tokens is None or self.tls_cert or self.allow_insecure_token:
            return
        for address in filter(None, (self.listen, self.http_listen)):
            if not is_loopback(address):
                raise ValueError(
                    f"refusing to take a bearer token in plaintext on {address}: anyone on "
                    "the path could read it and replay it. Serve TLS (--tls-cert and "
                    "--tls-key), listen on loopback behind a TLS-terminating proxy, or, where "
                    "the network encrypts the traffic itself (a service mesh with mTLS), pass "
                    "--allow-insecure-token"
                )


def _listen(server: grpc.aio.Server, address: str, what: str, credentials=None) -> int:
    """The port `server` owns at `address` (`add_port`); ValueError saying what to check
    where another process holds it."""
    port = add_port(server, address, credentials)
    if port == 0:
        raise ValueError(f"cannot listen{what} on {address}: is the address in use?")
    return port


class GatewayServer:
    """The gRPC server around a `Gateway`, with health, reflection and draining, and the
    OpenAI-compatible HTTP API in the same event loop when `http_listen` is set."""

    def __init__(self, config: GatewayConfig) -> None:
        self.config = config
        self.gateway = Gateway(config.upstream, config.limits)
        self.health = health.aio.HealthServicer()
        interceptors = [AuthInterceptor(config.tokens)] if config.tokens else []
        self.server = grpc.aio.server(interceptors=interceptors, options=SERVER_OPTIONS)
        self.server.add_generic_rpc_handlers((_handlers(self.gateway),))
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        reflection.enable_server_reflection(
            (SERVICE, health.SERVICE_NAME, reflection.SERVICE_NAME), self.server
        )
        self.port = self._bind(self.server, config.listen)
        self.watcher: asyncio.Task | None = None
        self.health_server = None
        if config.health_listen:
            self.health_server = grpc.aio.server(options=EXCLUSIVE)
            health_pb2_grpc.add_HealthServicer_to_server(self.health, self.health_server)
            self.health_port = _listen(
                self.health_server, config.health_listen, " for health probes"
            )
        self.http = None
        if config.http_listen:
            from services.gateway.openai_api import HttpServer  # FastAPI only when asked for

            self.http = HttpServer(self.gateway, config)

    def _bind(self, server: grpc.aio.Server, address: str) -> int:
        tls_files = self.config.tls_cert, self.config.tls_key
        if any(tls_files) and not all(tls_files):
            raise ValueError("TLS needs both a certificate and a key file")
        credentials = None
        if all(tls_files):
            credentials = tls.ReloadingCertificate(*tls_files).credentials()
        return _listen(server, address, "", credentials)

    async def start(self) -> None:
        # One probe before listening, so that a gateway in front of a ready fleet serves its
        # first call; bounded by PROBE_TIMEOUT_S.
        self.gateway.ready = await self.gateway.probe()
        await self.server.start()
        if self.health_server is not None:
            await self.health_server.start()
        if self.http is not None:
            await self.http.start()
        # `liveness` is SERVING while the process runs (a probe that restarts the gateway
        # must not fire because the engines are down); the others follow readiness.
        await self.health.set(LIVENESS, health_pb2.HealthCheckResponse.SERVING)
        await self._set_ready(self.gateway.ready)
        self.watcher = asyncio.create_task(self.gateway.watch_replicas(self._set_ready))

    async def _set_ready(self, ready: bool) -> None:
        if self.gateway.draining:
            return  # draining is NOT_SERVING whatever the replicas do
        status = health_pb2.HealthCheckResponse
        for name in ("", SERVICE):
            await self.health.set(name, status.SERVING if ready else status.NOT_SERVING)

    async def stop(self) -> None:
        """Drain: report NOT_SERVING, refuse new calls, let running streams finish."""
        if self.watcher is not None:
            self.watcher.cancel()
        for name in ("", SERVICE):
            await self.health.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
        await self.gateway.drain(self.config.drain_seconds)
        if self.http is not None:
            await self.http.stop()
        await self.server.stop(grace=1.0)
        if self.health_server is not None:
            await self.health_server.stop(grace=None)
        await self.gateway.close()


def _handlers(gateway: Gateway) -> grpc.GenericRpcHandler:
    """Our own handlers, not the generated ones: a request that fails to parse reaches
    the method as `_Malformed` and is refused with INVALID_ARGUMENT, not INTERNAL."""
    out = pb.GenerateResponse.SerializeToString
    methods = {
        "Generate": grpc.unary_stream_rpc_method_handler(
            _counted_stream("Generate", gateway.Generate), _parser(pb.GenerateRequest), out
        ),
        "GenerateUnary": grpc.unary_unary_rpc_method_handler(
            _counted("GenerateUnary", gateway.GenerateUnary), _parser(pb.GenerateRequest), out
        ),
    }
    for name, asked, answer in (
        ("GetModelInfo", pb.GetModelInfoRequest, pb.ModelInfo),
        ("Abort", pb.AbortRequest, pb.AbortResponse),
        ("Tokenize", pb.TokenizeRequest, pb.TokenizeResponse),
        ("Detokenize", pb.DetokenizeRequest, pb.DetokenizeResponse),
    ):
        methods[name] = grpc.unary_unary_rpc_method_handler(
            _counted(name, getattr(gateway, name)), _parser(asked), answer.SerializeToString
        )
    return grpc.method_handlers_generic_handler(SERVICE, methods)


@contextlib.contextmanager
def _counting(name: str, context) -> Iterator[None]:
    """Count a call by method and final status; a call cancelled under it as CANCELLED."""
    try:
        yield
    except asyncio.CancelledError:
        metrics.CALLS.labels(name, grpc.StatusCode.CANCELLED.name).inc()
        raise
    finally:
        if not context.cancelled():
            code = context.code() or grpc.StatusCode.OK
            metrics.CALLS.labels(name, code.name).inc()


def _counted(name: str, method):
    async def handle(request, context):
        with _counting(name, context):
            return await method(request, context)

    return handle


def _counted_stream(name: str, method):
    async def handle(request, context):
        with _counting(name, context):
            async for response in method(request, context):
                yield response

    return handle
