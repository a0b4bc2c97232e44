"""A real local fleet for the tests of this folder: Redis, Ray, Serve with two engine
replicas of the default model, and the gateway, all on loopback."""

from __future__ import annotations

import os
import sys

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

import grpc
import pytest
from fleet_helpers import REPLICAS, fleet_config

from services.gen.selfspec.v1 import generation_pb2_grpc as pb_grpc
from services.serve.local import Fleet, FleetOptions, free_port


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
