"""Ready means able to generate. A replica runs a short generation before it reports
ready; the gateway reports NOT_SERVING, and refuses calls at once, while no replica is
ready; Serve replaces a replica whose engine keeps failing its steps.

Each fleet test runs a fleet of its own with one replica, broken on purpose through the
test-only `SELFSPEC_FAULT` (see `services.serve.app`) where it needs to be.
"""

from __future__ import annotations

import grpc
import pytest
from fleet_helpers import chat, fleet_config, running_fleet, wait_until
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.gen.selfspec.v1 import generation_pb2_grpc as pb_grpc
from services.serve.app import FAILED_REQUESTS_UNHEALTHY, FAULT_ENV

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


def health_of(channel: grpc.Channel, service: str = "") -> int:
    stub = health_pb2_grpc.HealthStub(channel)
    return stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=10).status


def engine_status() -> tuple[str, str]:
    """The Engine deployment's status and message in Serve ("" before it is deployed)."""
    from ray import serve

    app = serve.status().applications.get("selfspec")
    engine = app.deployments.get("Engine") if app is not None else None
    return (engine.status, engine.message) if engine is not None else ("", "")


def engine_replicas() -> set[str]:
    """The names of the Engine replica actors alive now."""
    import ray

    return {
        a["name"]
        for a in ray.util.list_named_actors(all_namespaces=True)
        if "Engine" in a["name"] and a["name"].startswith("SERVE_REPLICA")
    }


def assert_refused_at_once(channel: grpc.Channel) -> None:
    """Refused by the gateway's readiness check (a call queued instead would end
    DEADLINE_EXCEEDED), saying why."""
    stub = pb_grpc.GenerationStub(channel)
    with pytest.raises(grpc.RpcError) as refused:
        stub.GenerateUnary(chat("Say hi.", 4), timeout=60)
    assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "no engine replica is ready" in refused.value.details()


def test_a_broken_backend_is_never_ready(tmp_path):
    """Every replica fails its warm-up: the gateway never reports SERVING, refuses a call
    at once with UNAVAILABLE, and Serve gives up on the deployment saying why."""
    with (
        running_fleet(
            fleet_config(replicas=1),
            tmp_path,
            num_cpus=1,
            wait_for_replicas=False,
            env={FAULT_ENV: "warmup"},
        ) as fleet,
        grpc.insecure_channel(fleet.options.listen) as channel,
    ):
        assert health_of(channel, "liveness") == SERVING  # the gateway itself runs

        def given_up() -> bool:
            assert health_of(channel) == NOT_SERVING  # at every look, never SERVING
            return engine_status()[0] == "DEPLOY_FAILED"

        wait_until(given_up, 300, "Serve to give up on the replicas that fail their warm-up")
        assert "warm-up" in engine_status()[1], engine_status()[1]
        assert health_of(channel, "selfspec.v1.Generation") == NOT_SERVING
        assert_refused_at_once(channel)


def test_serving_once_a_replica_is_ready_and_not_after(tmp_path):
    """The gateway comes up before the replica has loaded; once it reports SERVING, the
    first call gets its whole answer. With the replica gone, it is NOT_SERVING again."""
    from ray import serve

    with (
        running_fleet(
            fleet_config(replicas=1), tmp_path, num_cpus=1, wait_for_replicas=False
        ) as fleet,
        grpc.insecure_channel(fleet.options.listen) as channel,
    ):
        wait_until(lambda: health_of(channel) == SERVING, 300, "the gateway to report SERVING")
        stub = pb_grpc.GenerationStub(channel)
        reply = stub.GenerateUnary(chat("Say hi.", 6, ignore_eos=True), timeout=60)
        assert len(reply.token_ids) == 6 and reply.replica_id
        serve.delete("selfspec")
        wait_until(lambda: health_of(channel) == NOT_SERVING, 60, "NOT_SERVING without replicas")
        assert_refused_at_once(channel)


def test_a_replica_whose_steps_keep_failing_is_replaced(tmp_path):
    """The replica passes its warm-up, then every step of its engine fails: its health
    check fails and Serve starts another in its place."""
    config = fleet_config(replicas=1)
    (engine,) = config["applications"][0]["deployments"]
    engine["health_check_period_s"] = 1  # Serve replaces after 3 failed checks in a row
    with running_fleet(config, tmp_path, num_cpus=1, env={FAULT_ENV: "steps"}) as fleet:
        (first,) = engine_replicas()
        with grpc.insecure_channel(fleet.options.listen) as channel:
            stub = pb_grpc.GenerationStub(channel)
            # Each call fails its own request, with INTERNAL (an engine fault, not retried).
            for _ in range(FAILED_REQUESTS_UNHEALTHY):
                with pytest.raises(grpc.RpcError) as failed:
                    stub.GenerateUnary(chat("Say hi.", 4), timeout=60)
                assert failed.value.code() == grpc.StatusCode.INTERNAL, failed.value.details()
        wait_until(
            lambda: engine_replicas() - {first} and engine_status()[0] == "HEALTHY",
            180,
            "Serve to replace the failing replica",
        )
        assert first not in engine_replicas()


def test_the_engine_counts_failed_requests_in_a_row():
    """What the health check reads: requests that failed in a row, back to 0 after one
    that completed."""
    from services.engine import Engine, SamplingParams

    engine = Engine.from_pretrained("default", dtype="float32", kv_cache_bytes=16 << 20)
    verify = engine.runner.verify

    def broken(*args, **kwargs):
        raise RuntimeError("a verification pass failed")

    engine.start()
    try:
        engine.runner.verify = broken
        params = SamplingParams(max_tokens=4, ignore_eos=True)
        for n in (1, 2):
            (done,) = engine.generate("Say hi.", params, "ngram", chat=True)
            assert done.finish_reason == "error" and engine.consecutive_failures == n
        engine.runner.verify = verify
        (done,) = engine.generate("Say hi.", params, "ngram", chat=True)
        assert done.finish_reason == "length" and engine.consecutive_failures == 0
    finally:
        engine.shutdown()
