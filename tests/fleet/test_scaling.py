"""Autoscaling under a traffic step, and the gateway killed and restarted, on a fleet of
its own (one to two engine replicas)."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest
from fleet_helpers import chat, fleet_config, running_fleet, wait_until

from services.gen.selfspec.v1 import generation_pb2_grpc as pb_grpc
from services.serve.local import Fleet


@pytest.fixture(scope="module")
def scaling_fleet(tmp_path_factory) -> Fleet:
    config = fleet_config(replicas=1)
    app = config["applications"][0]
    app["args"].update(kv_cache_bytes=96 << 20, max_waiting=64)  # the burst queues, not fails
    (engine,) = app["deployments"]
    engine.pop("num_replicas")
    engine["autoscaling_config"] = {
        "min_replicas": 1,
        "max_replicas": 2,
        "target_ongoing_requests": 2,
        "look_back_period_s": 2,
        "upscale_delay_s": 1,
        "downscale_delay_s": 4,
    }
    with running_fleet(config, tmp_path_factory.mktemp("scaling"), num_cpus=2) as fleet:
        yield fleet


def running_replicas() -> int:
    from ray import serve

    app = serve.status().applications["selfspec"]
    return app.deployments["Engine"].replica_states.get("RUNNING", 0)


def test_traffic_step_scales_up_and_back_down_without_failures(scaling_fleet):
    """Low, high, low: Serve adds a replica under the burst and removes it afterwards;
    every request, those in flight while the replica drains included, succeeds."""
    assert running_replicas() == 1
    failures: list[str] = []
    trickled: list[int] = []  # one entry per trickle call that ended
    stop = threading.Event()

    with grpc.insecure_channel(scaling_fleet.options.listen) as channel:
        stub = pb_grpc.GenerationStub(channel)

        def ask(i: int, tokens: int) -> None:
            try:
                reply = stub.GenerateUnary(
                    chat(f"Tell story {i}.", tokens, ignore_eos=True), timeout=300
                )
                assert len(reply.token_ids) == tokens
            except (grpc.RpcError, AssertionError) as exc:
                failures.append(repr(exc))

        def trickle() -> None:  # low traffic throughout, including the scale-down
            while not stop.is_set():
                ask(len(trickled), 4)
                trickled.append(1)
                time.sleep(0.2)  # a pace, not a wait

        background = threading.Thread(target=trickle)
        background.start()
        try:
            with ThreadPoolExecutor(8) as pool:  # the step up: eight long requests at once
                burst = [pool.submit(ask, 100 + i, 120) for i in range(8)]
                wait_until(lambda: running_replicas() == 2, 120, "a second replica")
                for f in burst:
                    f.result()
            wait_until(lambda: running_replicas() == 1, 120, "the scale-down")
            after = len(trickled)  # traffic goes on after the scale-down, too
            wait_until(lambda: len(trickled) >= after + 5, 60, "calls after the scale-down")
        finally:
            stop.set()
            background.join()
    assert not failures, failures


def test_clients_reconnect_to_a_restarted_gateway(scaling_fleet):
    with grpc.insecure_channel(scaling_fleet.options.listen) as channel:
        stub = pb_grpc.GenerationStub(channel)
        assert stub.GenerateUnary(chat("hi", 2), timeout=60).token_ids
        scaling_fleet.gateway.kill()
        scaling_fleet.gateway.wait()
        with pytest.raises(grpc.RpcError) as down:
            stub.GenerateUnary(chat("hi", 2), timeout=5)
        assert down.value.code() == grpc.StatusCode.UNAVAILABLE
        scaling_fleet.restart_gateway()
        reply = stub.GenerateUnary(chat("hi", 2), timeout=60, wait_for_ready=True)
        assert reply.token_ids
