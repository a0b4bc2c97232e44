"""In process, end to end: two engine replicas on the default model start from a poor
skip set; their FleetLinks report telemetry and score the controller's candidates on
the text they served; the controller adopts better skip sets, the replicas apply
them, and measured acceptance on the same prompts rises."""

from __future__ import annotations

import json
import threading

from controller_helpers import poor_draft, replica
from waiting import wait_for

from services.common import redis_schema as rs
from services.common.params import SamplingParams
from services.controller.controller import Controller, Settings
from services.serve.fleet_link import FleetLink

PROMPTS = [
    "Write a Python function that returns the square of a number.",
    "Explain in two sentences why the sky is blue.",
    "List three fruits and their colours.",
    "What is the capital of France? Answer in one sentence.",
]
PARAMS = SamplingParams(max_tokens=24, ignore_eos=True)


def serve_prompts(engines) -> tuple[float, list[list[int]]]:
    """Each replica serves the prompt mix (in parallel); returns the acceptance of what
    was drafted, and the outputs."""
    results = [None] * len(engines)

    def run(i):
        results[i] = engines[i].generate(PROMPTS, PARAMS, chat=True)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(engines))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    done = [c for r in results for c in r]
    drafted = sum(c.stats["drafted_tokens"] for c in done)
    accepted = sum(c.stats["accepted_tokens"] for c in done)
    return accepted / max(drafted, 1), [c.token_ids for c in done]


def test_controller_raises_acceptance_from_a_poor_start(engine, redis_server):
    model = "smollm-e2e"
    engines = [replica(engine, poor_draft()), replica(engine, poor_draft())]
    links = [
        FleetLink(e, redis_server.url, model, f"replica-{i}", interval_s=0.3, poll_s=0.5)
        for i, e in enumerate(engines)
    ]
    settings = Settings(
        lease_s=2.0,
        tick_s=0.2,
        decide_every_s=1.0,
        min_positions=150,
        round_timeout_s=20,
        modes=("skip",),  # the operator wants layer drafts: measure the search's effect
    )
    controller = Controller(redis_server.url, "ctl-e2e", settings)
    client = redis_server.client()
    for e in engines:
        e.start()
    for fl in links:
        fl.start()
    controller.start()
    try:
        before, outputs = serve_prompts(engines)

        def adopted_and_applied():
            """The current record once the search adopted a skip set that agrees at least
            half the time and every replica runs it."""
            search = json.loads(client.get(rs.model_key(model, "search")) or "{}")
            text = client.get(rs.model_key(model, "current"))
            if not search.get("adopted") or text is None:
                return None
            record = rs.Record.parse(text)
            scores = {r["key"]: r["agreement"] for r in search.get("last", [])}
            incumbent = rs.skip_key(record.draft["skip_attn"], record.draft["skip_mlp"])
            good = scores.get(incumbent, 0.0) >= 0.5 and incumbent == search["incumbent"]
            applied = all(fl.version == record.version for fl in links)
            return record if good and applied else None

        record = wait_for(adopted_and_applied, every=0.5, what="an adopted skip set")
        after, outputs_after = serve_prompts(engines)
    finally:
        controller.stop()
        for fl in links:
            fl.stop()
        for e in engines:
            e.shutdown()
    poor = poor_draft()
    adopted = (tuple(record.draft["skip_attn"]), tuple(record.draft["skip_mlp"]))
    assert adopted != (poor.skip_attn, poor.skip_mlp)
    assert all(e.default_draft.skip_attn == adopted[0] for e in engines)
    assert after > before + 0.2, (before, after, record.draft)
    assert outputs_after == outputs  # greedy output never changes with the config
