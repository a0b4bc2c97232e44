"""Back-pressure settings and the gateway's limits, without a fleet: the app args that size
every queue, the `selfspec serve` flags that set them, and a real gateway in front of a fake
upstream that holds or refuses calls as a full fleet would."""

from __future__ import annotations

import asyncio
import contextlib

import grpc
import pytest
from fleet_helpers import chat, fleet_config

from services.gateway.server import (
    RETRY_AFTER_KEYS,
    GatewayConfig,
    GatewayServer,
    Limits,
    Upstream,
)
from services.gen.selfspec.v1 import generation_pb2 as pb
from services.gen.selfspec.v1 import generation_pb2_grpc as pb_grpc
from services.serve import local
from services.serve.app import ARG_OPTIONS, EngineSettings, build

Code = grpc.StatusCode
# What Serve's gRPC proxy says when its queue is full (ray.serve.exceptions.BackPressureError).
SERVE_FULL = "Request dropped due to backpressure (num_queued_requests=8, max_queued_requests=8)."
# What gRPC says of a message over a size limit: also RESOURCE_EXHAUSTED, but no retry helps.
TOO_LARGE = "Received message larger than max (5000000 vs. 4194304)"


# -- the settings --------------------------------------------------------------------------


def test_the_engines_queue_is_never_the_binding_limit_by_default():
    settings = EngineSettings(max_ongoing_requests=24)
    assert settings.engine_max_waiting >= 24  # Serve never sends a replica more than 24
    assert EngineSettings(max_ongoing_requests=24, max_waiting=3).engine_max_waiting == 3


@pytest.mark.parametrize(
    "args",
    [
        {"max_queued_requests": -1},  # Serve's "no limit": an unbounded queue
        {"max_ongoing_requests": 0},
        {"max_draft_configs": 0},
        {"max_waiting": 0},
        {"max_ongoing_requests": True},
        {"allow_draft_override": "false"},  # a string is truthy: refused, not guessed at
    ],
)
def test_bad_limits_are_refused_with_their_name(args):
    (name,) = args
    with pytest.raises(ValueError, match=name):
        EngineSettings.from_args(args)


def test_build_gives_serve_the_limits_from_the_args():
    app = build({"max_ongoing_requests": 7, "max_queued_requests": 3})
    deployment = app._bound_deployment  # Serve has no public reader of a bound app's options
    assert (deployment.max_ongoing_requests, deployment.max_queued_requests) == (7, 3)


def test_serve_flags_set_the_app_args_and_the_gateways_limit():
    args = local.build_parser().parse_args(
        ["--max-ongoing-requests", "16", "--max-queued-requests", "4"]
        + ["--no-allow-draft-override", "--max-draft-configs", "2"]
        + ["--gateway-max-in-flight", "100"]
    )
    options = local.options_from(args)
    app_args = options.config["applications"][0]["args"]
    assert app_args["max_ongoing_requests"] == 16 and app_args["max_queued_requests"] == 4
    assert app_args["allow_draft_override"] is False and app_args["max_draft_configs"] == 2
    assert options.gateway_args == ["--max-in-flight", "100"]
    EngineSettings.from_args(app_args)  # the app takes them all


def test_serve_flags_leave_the_config_alone_unless_given():
    options = local.options_from(local.build_parser().parse_args([]))
    app_args = options.config["applications"][0]["args"]
    assert app_args["max_queued_requests"] == 64 and "allow_draft_override" in app_args
    assert options.gateway_args == []


@pytest.mark.parametrize("flag", ["--max-queued-requests", "--gateway-max-in-flight"])
def test_serve_refuses_a_limit_below_one(flag):
    with pytest.raises(ValueError, match=flag):
        local.options_from(local.build_parser().parse_args([flag, "0"]))


@pytest.mark.parametrize("option", ARG_OPTIONS)
def test_a_config_that_sets_a_limit_on_the_deployment_is_refused(tmp_path, option):
    """Serve would apply it over the args, and the engines' queues would disagree."""
    config = fleet_config(replicas=1)
    config["applications"][0]["deployments"][0][option] = 8
    with pytest.raises(ValueError, match=f"set {option} in the application's args"):
        local.Fleet(local.FleetOptions(config=config, log_dir=tmp_path))


def test_the_retry_hint_is_jittered_upwards():
    hints = {Limits(retry_after_ms=400).retry_after() for _ in range(200)}
    assert min(hints) >= 400 and max(hints) < 600 and len(hints) > 10


# -- a gateway in front of a fake upstream ------------------------------------------------


class FakeUpstream(pb_grpc.GenerationServicer):
    """Serve's proxy as the gateway sees it: `hold` keeps each stream open until released,
    `full` refuses each call as a full Serve queue does, `too_large` as a size limit does."""

    def __init__(self, mode: str) -> None:
        self.mode = mode
        self.calls = 0
        self.release = asyncio.Event()

    async def GetModelInfo(self, request, context):
        return pb.ModelInfo(model="fake")  # the gateway's readiness probe

    async def Generate(self, request, context):
        self.calls += 1
        if self.mode in ("full", "too_large"):
            await context.abort(
                Code.RESOURCE_EXHAUSTED, {"full": SERVE_FULL}.get(self.mode, TOO_LARGE)
            )
        yield pb.GenerateResponse(request_id=request.request_id, text="a", token_ids=[1])
        await self.release.wait()
        yield pb.GenerateResponse(request_id=request.request_id, finish_reason=1)


@contextlib.asynccontextmanager
async def gateway_before(upstream: FakeUpstream, limits: Limits):
    """A real gateway on loopback in front of `upstream`; yields a stub to the gateway."""
    server = grpc.aio.server()
    pb_grpc.add_GenerationServicer_to_server(upstream, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    upstream_address = Upstream(f"127.0.0.1:{port}")
    config = GatewayConfig("127.0.0.1:0", upstream_address, drain_seconds=0, limits=limits)
    gateway = GatewayServer(config)
    await gateway.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{gateway.port}") as channel:
            yield pb_grpc.GenerationStub(channel)
    finally:
        upstream.release.set()
        await gateway.stop()
        await server.stop(None)


async def refusal(call) -> grpc.aio.AioRpcError:
    """The error a stream ends with."""
    with pytest.raises(grpc.aio.AioRpcError) as error:
        async for _ in call:
            pass
    return error.value


def assert_retry_hint(error: grpc.aio.AioRpcError, retry_after_ms: int) -> None:
    assert error.code() == Code.RESOURCE_EXHAUSTED and "retry after" in error.details()
    metadata = dict(error.trailing_metadata())
    for key in RETRY_AFTER_KEYS:
        assert retry_after_ms <= int(metadata[key]) < 1.5 * retry_after_ms, metadata


def test_the_gateway_refuses_past_its_limit_at_once():
    async def scenario():
        upstream = FakeUpstream("hold")
        async with gateway_before(upstream, Limits(max_in_flight=2, retry_after_ms=300)) as stub:
            held = [stub.Generate(chat(f"story {i}", 8), timeout=30) for i in range(2)]
            for call in held:
                await call.read()  # both admitted and streaming
            # Refused while both are still held: the call did not wait for room.
            error = await refusal(stub.Generate(chat("one more", 8), timeout=30))
            assert_retry_hint(error, 300)
            assert "limit of 2 calls in flight" in error.details()
            assert upstream.calls == 2  # the refused call cost the fleet nothing
            upstream.release.set()
            for call in held:
                assert (await call.read()).finish_reason == 1
                assert await call.read() is grpc.aio.EOF and await call.code() == Code.OK
            # Room again: the next call goes through.
            reply = await stub.GenerateUnary(chat("after", 8), timeout=30)
            assert reply.finish_reason == 1

    asyncio.run(scenario())


def test_a_full_fleet_is_passed_on_with_a_hint_and_not_retried():
    async def scenario():
        upstream = FakeUpstream("full")
        async with gateway_before(upstream, Limits(retry_after_ms=250)) as stub:
            for method in (stub.Generate, stub.GenerateUnary):
                before = upstream.calls
                call = method(chat("hello", 8), timeout=30)
                if method is stub.Generate:
                    error = await refusal(call)
                else:
                    with pytest.raises(grpc.aio.AioRpcError) as raised:
                        await call
                    error = raised.value
                assert_retry_hint(error, 250)
                assert "at capacity" in error.details() and SERVE_FULL in error.details()
                assert upstream.calls == before + 1  # one attempt, not retried

    asyncio.run(scenario())


def test_a_message_too_large_gets_no_retry_hint():
    async def scenario():
        async with gateway_before(FakeUpstream("too_large"), Limits()) as stub:
            error = await refusal(stub.Generate(chat("hello", 8), timeout=30))
            assert error.code() == Code.RESOURCE_EXHAUSTED and error.details() == TOO_LARGE
            assert not set(RETRY_AFTER_KEYS) & set(dict(error.trailing_metadata()))

    asyncio.run(scenario())
