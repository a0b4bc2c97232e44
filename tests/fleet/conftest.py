"""A real local fleet for the tests of this folder: Redis, Ray, Serve with two engine
replicas of the default model, and the gateway, all on loopback."""

from __future__ import annotations

import os

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

import grpc
import pytest
from fleet_helpers import REPLICAS, fleet_config, running_fleet

from services.gen.selfspec.v1 import generation_pb2_grpc as pb_grpc
from services.serve.local import Fleet


@pytest.fixture(scope="module")
def fleet(tmp_path_factory) -> Fleet:
    with running_fleet(fleet_config(), tmp_path_factory.mktemp("fleet"), num_cpus=REPLICAS) as f:
        yield f


@pytest.fixture(scope="module")
def stub(fleet) -> pb_grpc.GenerationStub:
    with grpc.insecure_channel(fleet.options.listen) as channel:
        yield pb_grpc.GenerationStub(channel)
