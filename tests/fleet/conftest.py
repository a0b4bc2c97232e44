"""A real local fleet for the tests of this folder: Redis, Ray, Serve with two engine
replicas of the default model, and the gateway, all on loopback."""

from __future__ import annotations

import os
import sys

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

import grpc
import pytest
from fleet_helpers import REPLICAS

from services.gen.selfspec.v1 import generation_pb2_grpc as pb_grpc
from services.serve.local import DEFAULT_CONFIG, Fleet, FleetOptions, free_port, load_config


def fleet_config(replicas: int = REPLICAS) -> dict:
    config = load_config(DEFAULT_CONFIG)
    config["http_options"]["port"] = free_port()
    config["grpc_options"]["port"] = free_port()
    app = config["applications"][0]
    # A small KV pool and a short queue, so that tests can fill them.
    app["args"].update(kv_cache_bytes=32 << 20, max_waiting=4, threads=1)
    (engine,) = app["deployments"]
    engine.pop("autoscaling_config")
    engine.update(num_replicas=replicas, graceful_shutdown_timeout_s=5)
    return config


@pytest.fixture(scope="module")
def fleet(tmp_path_factory) -> Fleet:
    options = FleetOptions(
        config=fleet_config(),
        listen=f"127.0.0.1:{free_port()}",
        num_cpus=REPLICAS,
        controller=False,
        log_dir=tmp_path_factory.mktemp("fleet"),
    )
    fleet = Fleet(options, say=lambda line: print(line, file=sys.stderr)).start()
    yield fleet
    fleet.stop()


@pytest.fixture(scope="module")
def stub(fleet) -> pb_grpc.GenerationStub:
    with grpc.insecure_channel(fleet.options.listen) as channel:
        yield pb_grpc.GenerationStub(channel)
