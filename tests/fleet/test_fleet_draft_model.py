"""A fleet whose replica loads a draft model (app arg `draft_model`, `selfspec serve
--draft-model`): greedy text through the gateway is what drafting `off` gives, GetModelInfo
names the draft model, and the replica's metrics count its drafted tokens under mode
`model`. One replica of the default model (GGUF weights) drafting with its own first six
layers, saved as a checkpoint folder of their own."""

from __future__ import annotations

import urllib.request
from pathlib import Path

import grpc
import pytest
from fleet_helpers import chat, fleet_config, replica_stats, running_fleet

from services.engine.first_layers import save_first_layers
from services.gen.selfspec.v1 import generation_pb2 as pb
from services.gen.selfspec.v1 import generation_pb2_grpc as pb_grpc
from services.serve import local

pytestmark = pytest.mark.timeout(400)

DRAFT_LAYERS = 6  # of the default model's 30


@pytest.fixture(scope="module")
def draft_path(tmp_path_factory) -> Path:
    from services.engine import checkpoint

    out = tmp_path_factory.mktemp("draft") / "first-layers"
    return save_first_layers(checkpoint.resolve("default"), out, DRAFT_LAYERS)


@pytest.fixture(scope="module")
def fleet(tmp_path_factory, draft_path) -> local.Fleet:
    config = fleet_config(replicas=1)
    args = ["--draft-model", str(draft_path)]  # as `selfspec serve` sets the app args
    local._override_args(local.build_parser().parse_args(args), config["applications"][0]["args"])
    config["applications"][0]["args"]["metrics_port"] = 0
    with running_fleet(config, tmp_path_factory.mktemp("fleet"), num_cpus=1) as f:
        yield f


@pytest.fixture(scope="module")
def stub(fleet) -> pb_grpc.GenerationStub:
    with grpc.insecure_channel(fleet.options.listen) as channel:
        yield pb_grpc.GenerationStub(channel)


def test_serve_flag_sets_the_draft_model_and_its_mode():
    parse = local.build_parser().parse_args
    app: dict = {}
    local._override_args(parse(["--draft-model", "/models/small"]), app)
    assert app == {"draft_model": "/models/small", "draft": "model"}
    app = {}
    local._override_args(parse(["--draft-model", "/models/small", "--draft", "auto"]), app)
    assert app["draft"] == "auto"


def test_model_info_names_the_draft_model(stub, draft_path):
    info = stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=30)
    assert info.draft_model == str(draft_path)
    assert info.default_draft["mode"] == "model" and info.num_layers == 30


def test_greedy_text_equals_off_and_metrics_count_model_tokens(stub):
    (stats,) = replica_stats(expected=1).values()
    before = scrape(stats["metrics_port"])
    prompt = "Repeat after me: one two three, one two three, one two three."
    drafted = stub.GenerateUnary(chat(prompt, 24), timeout=120)  # the default: model
    off = chat(prompt, 24)
    off.draft.update({"mode": "off"})
    plain = stub.GenerateUnary(off, timeout=120)
    assert list(drafted.token_ids) == list(plain.token_ids) and drafted.text == plain.text
    assert drafted.usage.drafted_tokens > 0 and plain.usage.drafted_tokens == 0
    after = scrape(stats["metrics_port"])
    for name, n in (
        ("draft", drafted.usage.drafted_tokens),
        ("accepted", drafted.usage.accepted_tokens),
    ):
        series = f"selfspec_spec_decode_num_{name}_tokens_total"
        assert of_mode(after, series, "model") - of_mode(before, series, "model") == n, name


def scrape(port: int) -> dict[str, float]:
    """The replica's /metrics as {series with its labels: value}."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read()
    lines = [line for line in text.decode().splitlines() if line and not line.startswith("#")]
    return {name: float(value) for name, value in (line.rsplit(" ", 1) for line in lines)}


def of_mode(values: dict[str, float], name: str, mode: str) -> float:
    """The sum of metric `name`'s series labelled with drafting mode `mode`."""
    return sum(v for k, v in values.items() if k.split("{", 1)[0] == name and f'mode="{mode}"' in k)
