"""The gateway's ports: one another process holds is refused, never shared, and `selfspec
serve` reports the gateway up only once the gateway itself says it listens, so a port
taken while Ray started is an error with the gateway's log, not a fleet that refuses
every call. No Ray here: the gateway runs in front of a closed upstream port."""

from __future__ import annotations

import asyncio
import socket

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.common import internal_auth
from services.gateway.server import GatewayConfig, GatewayServer, Upstream
from services.serve.local import Fleet, FleetOptions, _terminate, free_port

pytestmark = pytest.mark.timeout(120)


def test_a_port_another_grpc_server_holds_is_refused_not_shared():
    async def main():
        holder = grpc.aio.server()  # gRPC's defaults, SO_REUSEPORT among them, as Ray's
        port = holder.add_insecure_port("127.0.0.1:0")
        await holder.start()
        try:
            with pytest.raises(ValueError, match="in use"):
                GatewayServer(GatewayConfig(f"127.0.0.1:{port}", Upstream("127.0.0.1:1")))
            held = f"127.0.0.1:{port}"  # the plaintext health port, as probes use
            config = GatewayConfig("127.0.0.1:0", Upstream("127.0.0.1:1"), health_listen=held)
            with pytest.raises(ValueError, match=f"cannot listen for health probes on {held}"):
                GatewayServer(config)
        finally:
            await holder.stop(None)

    asyncio.run(main())


def gateway_fleet(tmp_path, **options) -> Fleet:
    fleet = Fleet(FleetOptions(controller=False, log_dir=tmp_path, **options), say=print)
    internal_auth.write_new(fleet.internal_token_file)
    fleet.upstream = f"127.0.0.1:{free_port()}"  # nothing there: the gateway is NOT_SERVING
    return fleet


def test_ports_of_0_are_the_gateways_own_and_it_answers_on_them(tmp_path):
    fleet = gateway_fleet(tmp_path, listen="127.0.0.1:0", http_listen="127.0.0.1:0")
    try:
        fleet._start_gateway()
        assert not fleet.options.listen.endswith(":0")
        assert not fleet.options.http_listen.endswith(":0")
        with grpc.insecure_channel(fleet.options.listen) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            answer = stub.Check(health_pb2.HealthCheckRequest(service="liveness"), timeout=10)
        assert answer.status == health_pb2.HealthCheckResponse.SERVING
    finally:
        _terminate(fleet.gateway, grace_s=10)


def test_an_http_port_taken_before_the_gateway_starts_fails_the_start_with_its_log(tmp_path):
    with socket.socket() as taken:  # another process's listener, already accepting
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        http = f"127.0.0.1:{taken.getsockname()[1]}"
        fleet = gateway_fleet(tmp_path, listen="127.0.0.1:0", http_listen=http)
        with pytest.raises(RuntimeError, match="cannot listen for HTTP on " + http):
            fleet._start_gateway()
