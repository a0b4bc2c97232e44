"""Traces and metrics of a real fleet: one engine replica, Serve's gRPC proxy and the
gateway, with spans written to JSON-lines files and the replica's /metrics scraped.

Every component also pushes its metrics by OTLP to a receiver on loopback.

Twice: with Serve's own tracing on (our hook installed in its proxy and replicas), and
off, where the replica continues the gateway's `traceparent` from the gRPC metadata."""

from __future__ import annotations

import json
import urllib.request
import uuid
from pathlib import Path

import grpc
import pytest
from fleet_helpers import chat, fleet_config, replica_stats, running_fleet, wait_until

from services.common.telemetry import SERVE_HOOK
from services.serve.local import Fleet

pytestmark = pytest.mark.timeout(300)


MODES = {"serve-tracing": {"RAY_SERVE_TRACING_EXPORTER_IMPORT_PATH": SERVE_HOOK}, "direct": {}}


@pytest.fixture(scope="module", params=list(MODES))
def mode(request) -> str:
    return request.param


@pytest.fixture(scope="module")
def traces(tmp_path_factory, mode) -> Path:
    return tmp_path_factory.mktemp(f"traces-{mode}")


@pytest.fixture(scope="module")
def fleet(tmp_path_factory, traces, mode, otlp_receiver) -> Fleet:
    config = fleet_config(replicas=1)
    config["applications"][0]["args"]["metrics_port"] = 0
    with running_fleet(
        config,
        tmp_path_factory.mktemp("fleet"),
        num_cpus=1,
        env={
            "SELFSPEC_TRACE_FILE": str(traces / "spans.jsonl"),
            **otlp_receiver.env(),
            **MODES[mode],
        },
    ) as fleet:
        yield fleet


def spans(traces: Path) -> list[dict]:
    return [json.loads(line) for f in traces.glob("*.jsonl") for line in f.read_text().splitlines()]


def request_spans(traces: Path, request_id: str) -> dict[str, dict]:
    """The gateway's and the replica's span of one request, by service, once both ended."""

    def find():
        found = {
            s["service"]: s
            for s in spans(traces)
            if s["attributes"].get("gen_ai.response.id") == request_id
        }
        return found if {"selfspec-gateway", "selfspec-engine"} <= set(found) else None

    return wait_until(find, 30, f"the spans of {request_id}")


def scrape(port: int) -> dict[str, float]:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read()
    values = {}
    for line in text.decode().splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            values[name] = float(value)
    return values


def total(values: dict[str, float], name: str) -> float:
    """The sum of a metric over its series (`name` without labels)."""
    return sum(v for k, v in values.items() if k.split("{", 1)[0] == name)


# -- traces ------------------------------------------------------------------------------


def test_one_trace_links_gateway_proxy_router_and_replica(stub, traces, mode):
    request_id = uuid.uuid4().hex
    req = chat("Say hello.", 8, request_id=request_id, session_id="s-obs-route")
    reply = stub.GenerateUnary(req, timeout=120)
    assert reply.request_id == request_id
    ours = request_spans(traces, request_id)
    gateway, replica = ours["selfspec-gateway"], ours["selfspec-engine"]
    assert gateway["trace_id"] == replica["trace_id"]
    trace = {s["span_id"]: s for s in spans(traces) if s["trace_id"] == gateway["trace_id"]}
    chain, span = [], replica
    while span is not None:  # walk up from the replica's span to the root
        chain.append(span)
        span = trace.get(span["parent_span_id"])
    names = [s["name"] for s in reversed(chain)]
    assert chain[-1]["span_id"] == gateway["span_id"] and gateway["parent_span_id"] is None
    if mode == "direct":  # the replica read the gateway's traceparent itself
        assert [s["service"] for s in reversed(chain)] == ["selfspec-gateway", "selfspec-engine"]
        return
    # Serve carried the gateway's traceparent through its proxy and router to the replica.
    assert [s["service"] for s in reversed(chain)] == [
        "selfspec-gateway",
        "selfspec-proxy",
        "selfspec-proxy",
        "selfspec-engine",
        "selfspec-engine",
    ], names
    assert names[1].startswith("proxy_grpc_request") and names[2].startswith("route_to_replica")
    assert names[3].startswith("replica_handle_request")
    # Our router's span for its decision hangs under Serve's routing span.
    routing = [s for s in trace.values() if s["name"].startswith("choose_replicas")]
    assert routing and all(s["parent_span_id"] == chain[-3]["span_id"] for s in routing)
    assert routing[0]["attributes"]["selfspec.session_id"] == "s-obs-route"
    assert routing[0]["attributes"]["selfspec.router.affinity"] is True


def test_gen_ai_attributes(stub, traces):
    request_id = uuid.uuid4().hex
    req = chat("Count to five.", 10, request_id=request_id, session_id="s-obs-1", ignore_eos=True)
    req.temperature, req.top_p, req.top_k, req.seed = 0.5, 0.75, 20, 7
    parts = list(stub.Generate(req, timeout=120))
    usage = parts[-1].usage
    for service, span in request_spans(traces, request_id).items():
        a = span["attributes"]
        assert span["name"] == f"chat {a['gen_ai.request.model']}", service
        assert a["gen_ai.operation.name"] == "chat"
        assert a["gen_ai.request.max_tokens"] == 10 and a["gen_ai.request.top_k"] == 20
        assert a["gen_ai.request.temperature"] == 0.5 and a["gen_ai.request.top_p"] == 0.75
        assert a["gen_ai.request.seed"] == 7
        assert a["gen_ai.response.finish_reasons"] == ["length"]
        assert a["gen_ai.usage.output_tokens"] == usage.completion_tokens == 10
        assert a["gen_ai.usage.input_tokens"] == usage.prompt_tokens > 0
        assert a["selfspec.drafted_tokens"] == usage.drafted_tokens
        assert a["selfspec.accepted_tokens"] == usage.accepted_tokens
        assert a["selfspec.cached_prompt_tokens"] == usage.cached_prompt_tokens
        assert a["selfspec.session_id"] == a["gen_ai.conversation.id"] == "s-obs-1"
        assert a["selfspec.replica_id"] == parts[-1].replica_id
        assert [e["name"] for e in span["events"]][:1] == ["first_token"], service
        assert span["status"] != "ERROR"
    replica = request_spans(traces, request_id)["selfspec-engine"]["attributes"]
    assert replica["selfspec.drafting_mode"] == "auto"


def test_no_prompt_or_output_text_by_default(stub, traces):
    secret = f"zebra{uuid.uuid4().hex[:8]}"
    request_id = uuid.uuid4().hex
    reply = stub.GenerateUnary(chat(f"Repeat {secret}.", 8, request_id=request_id), timeout=120)
    request_spans(traces, request_id)
    raw = "".join(f.read_text() for f in traces.glob("*.jsonl"))
    assert secret not in raw
    assert "gen_ai.input.messages" not in raw and "gen_ai.output.messages" not in raw
    assert reply.text.strip() and json.dumps(reply.text)[1:-1] not in raw


def test_an_error_ends_the_span_with_its_status(stub, traces):
    request_id = uuid.uuid4().hex
    req = chat("hi", 4, request_id=request_id)
    req.draft.update({"mode": "skip", "skip_attn": [99]})  # refused by the replica
    with pytest.raises(grpc.RpcError) as err:
        stub.GenerateUnary(req, timeout=60)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    span = request_spans(traces, request_id)["selfspec-engine"]
    assert span["status"] == "ERROR" and span["attributes"]["error.type"] == "INVALID_ARGUMENT"


# -- the replica's metrics -----------------------------------------------------------------


def test_spec_decode_counters_add_up_to_the_replies(stub):
    (stats,) = replica_stats(expected=1).values()
    port = stats["metrics_port"]
    before = scrape(port)
    replies = []
    for mode in ("ngram", "auto", "skip"):
        req = chat("Repeat after me: one two three, one two three, one two three.", 16)
        req.draft.update({"mode": mode})
        replies.append(stub.GenerateUnary(req, timeout=120))
    after = scrape(port)

    def added(name: str) -> float:
        return total(after, name) - total(before, name)

    drafted = sum(r.usage.drafted_tokens for r in replies)
    accepted = sum(r.usage.accepted_tokens for r in replies)
    assert drafted > 0 and accepted > 0
    assert added("vllm:spec_decode_num_draft_tokens_total") == drafted
    assert added("vllm:spec_decode_num_accepted_tokens_total") == accepted
    assert added("vllm:spec_decode_num_accepted_tokens_per_pos_total") == accepted
    # The same counts by drafter (label `mode`).
    assert added("selfspec_spec_decode_num_draft_tokens_total") == drafted
    assert added("selfspec_spec_decode_num_accepted_tokens_total") == accepted
    assert 0 < added("vllm:spec_decode_num_drafts_total") <= drafted
    steps = sum(r.usage.verify_steps for r in replies)
    assert added("selfspec_drafting_mode_chosen_total") == steps
    assert added("vllm:prefix_cache_queries_total") == sum(r.usage.prompt_tokens for r in replies)
    assert added("vllm:prefix_cache_hits_total") == sum(
        r.usage.cached_prompt_tokens for r in replies
    )
    assert added("vllm:request_queue_time_seconds_count") == len(replies)
    assert total(after, "vllm:num_requests_running") == 0
    assert total(after, "vllm:num_requests_waiting") == 0
    assert 0 <= total(after, "vllm:kv_cache_usage_perc") <= 1
    assert "selfspec_config_version" in {k.split("{")[0] for k in after}
    assert total(after, "selfspec_draft_cost_ratio") > 0


def test_metrics_reach_an_otlp_collector(stub, otlp_receiver):
    """The gateway's latency histograms and the replica's counters, pushed by OTLP."""
    replies = list(stub.Generate(chat("Count from one to ten.", 12), timeout=120))
    assert sum(len(r.token_ids) for r in replies) == 12 and len(replies) > 1

    def count(service: str, name: str) -> float:
        metric = otlp_receiver.latest(service).get(name)
        if metric is None:
            return 0
        kind = metric.WhichOneof("data")
        points = getattr(metric, kind).data_points
        return sum(p.count if kind == "histogram" else p.as_double for p in points)

    def arrived():
        return (
            count("selfspec-gateway", "vllm:time_to_first_token_seconds") >= 1
            and count("selfspec-gateway", "vllm:inter_token_latency_seconds") >= 1
            and count("selfspec-engine", "vllm:request_queue_time_seconds") >= 1
        ) or None

    wait_until(arrived, 30, "the fleet's metrics at the OTLP receiver")
    assert "vllm:spec_decode_num_draft_tokens" in otlp_receiver.latest("selfspec-engine")
