"""An engine replica's Prometheus metrics, named as vLLM names them where vLLM has one.

Each replica serves its own /metrics with `prometheus_client` on the port of the app arg
`metrics_port` (0: any free port; N: the first free of N..N+15, for several replicas on
one node). Why not Ray's metrics agent (`ray.serve.metrics`): Ray renames metrics (a
`ray_` prefix, `:` not allowed), so vLLM's names, and the dashboards and autoscalers
built on them, would not work, and it needs the per-node agent running to test.

Nothing is recorded in the engine loop: a scrape reads the engine's own running totals
(`Engine.stats()`, its `Telemetry` and measured `Costs`), copied under their locks; the
queue time is observed as a request starts and the prefix-cache counters are added as
it finishes, both on the replica's event loop. Series carry `model_name` (as vLLM's) and
`replica`, which also tells them apart from the gateway's series of the same name.
Drafted and accepted tokens are also counted per drafter (label `mode`), under our own
names, since vLLM's counters carry no such label.
"""

from __future__ import annotations

import errno
import logging
from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

log = logging.getLogger(__name__)

PORT_TRIES = 16
LABELS = ["model_name", "replica"]
QUEUE_BUCKETS = (0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)


class ReplicaMetrics(Collector):
    """Collects an engine's metrics at scrape time."""

    def __init__(self, engine, model_name: str, replica: str) -> None:
        self.engine = engine
        self.labels = [model_name, replica]
        self.prompt_tokens = 0  # vllm:prefix_cache_queries, in tokens
        self.cached_prompt_tokens = 0  # vllm:prefix_cache_hits, in tokens
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(self)
        # Observed once per request as it starts (the engine times it), so a histogram.
        self.queue_time = Histogram(
            "vllm:request_queue_time_seconds",
            "Time a request waited for admission (KV blocks) before its prefill.",
            LABELS,
            buckets=QUEUE_BUCKETS,
            registry=self.registry,
        ).labels(model_name, replica)
        self.port: int | None = None

    def request_done(self, usage) -> None:
        """A request ended (`usage`: its last reply's `Usage`): count its prompt's cache use."""
        self.prompt_tokens += usage.prompt_tokens
        self.cached_prompt_tokens += usage.cached_prompt_tokens

    def _backend(self) -> GaugeMetricFamily:
        """The compute path as labels of a constant 1 (Prometheus' info convention)."""
        info = self.engine.model.backend.describe()
        keys = ["backend", "weights", "compute", "linear", "attention", "device"]
        g = GaugeMetricFamily(
            "selfspec_backend_info", "The replica's compute path.", labels=[*LABELS, *keys]
        )
        g.add_metric([*self.labels, *(info[k] for k in keys)], 1)
        return g

    def serve(self, port: int, host: str = "0.0.0.0") -> int:
        """Serve /metrics in a background thread; returns the port bound."""
        last: OSError | None = None
        for p in [0] if port == 0 else range(port, port + PORT_TRIES):
            try:
                server, _ = start_http_server(p, addr=host, registry=self.registry)
            except OSError as exc:  # taken by another replica on this node: try the next
                if exc.errno != errno.EADDRINUSE:
                    raise
                last = exc
                continue
            self.port = server.server_port
            return self.port
        raise OSError(f"no free metrics port in {port}..{port + PORT_TRIES - 1}: {last}")

    # -- prometheus_client's Collector ----------------------------------------------

    def collect(self) -> Iterator:
        yield self._backend()
        yield from self._load()
        yield from self._prefix_cache()
        yield from self._spec_decode()
        yield from self._spec_decode_by_mode()
        yield from self._drafting()

    def _gauge(self, name: str, doc: str, value: float) -> GaugeMetricFamily:
        g = GaugeMetricFamily(name, doc, labels=LABELS)
        g.add_metric(self.labels, value)
        return g

    def _counter(self, name: str, doc: str, value: float) -> CounterMetricFamily:
        c = CounterMetricFamily(name, doc, labels=LABELS)
        c.add_metric(self.labels, value)
        return c

    def _load(self) -> Iterator:
        s = _stats(self.engine)
        yield self._gauge(
            "vllm:num_requests_running",
            "Requests prefilling or decoding.",
            s.get("running", 0) + s.get("prefilling", 0),
        )
        yield self._gauge("vllm:num_requests_waiting", "Requests queued.", s.get("waiting", 0))
        total = s.get("kv_blocks_total", 0)
        # Blocks kept for finished sessions are reusable on demand, as vLLM's cached blocks.
        used = s.get("kv_blocks_in_use", 0) / total if total else 0.0
        yield self._gauge("vllm:kv_cache_usage_perc", "KV cache usage (1 = full).", used)

    def _prefix_cache(self) -> Iterator:
        yield self._counter(
            "vllm:prefix_cache_queries", "Prompt tokens looked up in the cache.", self.prompt_tokens
        )
        yield self._counter(
            "vllm:prefix_cache_hits", "Prompt tokens found in the cache.", self.cached_prompt_tokens
        )

    def _spec_decode(self) -> Iterator:
        t = self.engine.telemetry.snapshot()
        drafted = _per_position(t.drafted)
        accepted = _per_position(t.accepted)
        drafts = sum(n for (mode, _), n in t.decisions.items() if mode != "off")
        yield self._counter(
            "vllm:spec_decode_num_drafts", "Draft proposals (sequence steps).", drafts
        )
        yield self._counter("vllm:spec_decode_num_draft_tokens", "Tokens drafted.", sum(drafted))
        yield self._counter(
            "vllm:spec_decode_num_accepted_tokens", "Drafted tokens accepted.", sum(accepted)
        )
        per_pos = CounterMetricFamily(
            "vllm:spec_decode_num_accepted_tokens_per_pos",
            "Drafted tokens accepted, by position in the draft.",
            labels=[*LABELS, "position"],
        )
        for i, n in enumerate(accepted):
            per_pos.add_metric([*self.labels, str(i)], n)
        yield per_pos

    def _spec_decode_by_mode(self) -> Iterator:
        """vLLM's token counters split by the drafter that drafted them (the engine's plan
        names: ngram, skip, early_exit, model, ...), so that a draft model's tokens, say,
        are told from the layer draft's; vLLM's own names above stay the sums."""
        t = self.engine.telemetry.snapshot()
        for name, doc, table in (
            ("selfspec_spec_decode_num_draft_tokens", "Tokens drafted, by drafter.", t.drafted),
            (
                "selfspec_spec_decode_num_accepted_tokens",
                "Drafted tokens accepted, by drafter.",
                t.accepted,
            ),
        ):
            family = CounterMetricFamily(name, doc, labels=[*LABELS, "mode"])
            for mode, n in _sum_by_mode(table).items():
                family.add_metric([*self.labels, mode], n)
            yield family

    def _drafting(self) -> Iterator:
        t = self.engine.telemetry.snapshot()
        chosen = CounterMetricFamily(
            "selfspec_drafting_mode_chosen",
            "Sequence steps by the drafting mode chosen (off: no draft).",
            labels=[*LABELS, "mode"],
        )
        for mode, n in _by_mode(t.decisions).items():
            chosen.add_metric([*self.labels, mode], n)
        yield chosen
        ratio = GaugeMetricFamily(
            "selfspec_draft_cost_ratio",
            "A draft pass's measured cost over a plain decode step, by mode and batch bucket.",
            labels=[*LABELS, "mode", "batch_bucket"],
        )
        for (mode, bucket), value in _cost_ratios(self.engine).items():
            ratio.add_metric([*self.labels, mode, bucket], value)
        yield ratio
        yield self._gauge(
            "selfspec_config_version",
            "The fleet drafting config in use (0: none yet).",
            getattr(self.engine, "config_version", 0),
        )


def _stats(engine) -> dict:
    """`Engine.stats()`, read from this thread while the loop runs: a dict that changes
    size mid-read raises, so try again."""
    for _ in range(5):
        try:
            return engine.stats()
        except RuntimeError:
            continue
    return {}


def _per_position(table: dict) -> list[int]:
    """Counts per draft position, summed over modes and batch buckets."""
    out: list[int] = []
    for counts in table.values():
        out.extend([0] * (len(counts) - len(out)))
        for i, n in enumerate(counts):
            out[i] += n
    return out


def _by_mode(decisions: dict) -> dict[str, int]:
    out: dict[str, int] = {}
    for (mode, _), n in decisions.items():
        out[mode] = out.get(mode, 0) + n
    return out


def _sum_by_mode(table: dict) -> dict[str, int]:
    """Tokens per drafter, over batch buckets and draft positions; "off" drafts none."""
    out: dict[str, int] = {}
    for (mode, _), counts in table.items():
        if mode != "off":
            out[mode] = out.get(mode, 0) + sum(counts)
    return out


def _cost_ratios(engine) -> dict[tuple[str, str], float]:
    costs = engine.costs.snapshot()
    decode = costs["decode"]
    out = {}
    for key, seconds in costs["draft_pass"].items():
        mode, bucket = key.rsplit("/", 1)
        if decode.get(bucket):
            out[(mode, bucket)] = seconds / decode[bucket]
    return out
