"""The controller on the real fleet: two engine replicas under Ray Serve start from a
drafting config that rarely agrees with the full model; the controller's search finds a
better skip set, both replicas apply it, and acceptance and tokens per verification pass
rise on the same prompts, with the same greedy output."""

from __future__ import annotations

import time

import grpc
import pytest
from fleet_helpers import chat, fleet_config, running_fleet

from services.gen.selfspec.v1 import generation_pb2 as pb
from services.gen.selfspec.v1 import generation_pb2_grpc as pb_grpc
from services.serve.local import Fleet, free_port

MIDDLE = list(range(2, 22))
POOR = {"mode": "skip", "skip_attn": MIDDLE, "skip_mlp": MIDDLE, "max_draft": 3}
PROMPTS = [
    "Write a Python function that returns the square of a number.",
    "Explain in two sentences why the sky is blue.",
    "List three fruits and their colours.",
    "What is the capital of France? Answer in one sentence.",
]


@pytest.fixture(scope="module")
def poor_fleet(tmp_path_factory) -> Fleet:
    config = fleet_config(replicas=2)
    config["applications"][0]["args"].update(draft=POOR, kv_cache_bytes=96 << 20, max_waiting=64)
    with running_fleet(
        config,
        tmp_path_factory.mktemp("controlled"),
        num_cpus=2,
        controller=True,
        controller_admin=f"127.0.0.1:{free_port()}",
        controller_args=["--decide-seconds", "1", "--min-positions", "150", "--modes", "skip"],
    ) as fleet:
        yield fleet


def serve_mix(stub) -> tuple[float, float, list[list[int]]]:
    """The prompt mix, twice (both replicas serve): acceptance, tokens per verify pass,
    and the outputs."""
    replies = [stub.GenerateUnary(chat(p, 24, ignore_eos=True), timeout=120) for p in PROMPTS * 2]
    drafted = sum(r.usage.drafted_tokens for r in replies)
    accepted = sum(r.usage.accepted_tokens for r in replies)
    steps = sum(r.usage.verify_steps for r in replies)
    tokens = sum(r.usage.completion_tokens - 1 for r in replies)  # the first is the prefill's
    return accepted / max(1, drafted), tokens / max(1, steps), [list(r.token_ids) for r in replies]


def applied_skip_sets(stub) -> set[tuple[int, ...]]:
    """The skip sets the replicas report (Serve spreads the calls over both)."""
    infos = [stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=30) for _ in range(12)]
    return {tuple(int(x) for x in i.default_draft["skip_attn"]) for i in infos}


def test_the_controller_raises_acceptance_on_the_fleet(poor_fleet):
    with grpc.insecure_channel(poor_fleet.options.listen) as channel:
        stub = pb_grpc.GenerationStub(channel)
        before, per_step_before, outputs = serve_mix(stub)
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline:
            sets = applied_skip_sets(stub)
            if len(sets) == 1 and sets != {tuple(MIDDLE)}:
                break
            serve_mix(stub)  # traffic for telemetry; the replicas score between requests
            time.sleep(2)
        else:
            pytest.fail(f"no better skip set applied on both replicas; they report {sets}")
        after, per_step_after, outputs_after = serve_mix(stub)
    print(
        f"acceptance {before:.2f} -> {after:.2f}; tokens per verify pass "
        f"{per_step_before:.2f} -> {per_step_after:.2f}; skip set {sets}"
    )
    assert after > before + 0.2, (before, after, sets)
    assert per_step_after > per_step_before, (per_step_before, per_step_after)
    assert outputs_after == outputs  # greedy output never depends on the config
