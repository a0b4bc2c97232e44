"""Metrics by OTLP: a component's Prometheus registry, pushed to an OpenTelemetry collector.

Every component keeps its metrics in `prometheus_client`, scraped at /metrics. When an
OTLP endpoint is configured (`OTEL_EXPORTER_OTLP_METRICS_ENDPOINT` or
`OTEL_EXPORTER_OTLP_ENDPOINT`, and `OTEL_METRICS_EXPORTER` is not `none`), a daemon thread
also converts what the registry holds into OTLP data every `OTEL_METRIC_EXPORT_INTERVAL`
milliseconds (default 60000) and sends it with the SDK's OTLP gRPC exporter, which reads
the other `OTEL_EXPORTER_OTLP_*` settings (headers, TLS, timeout). One set of metrics, two
ways out: OTLP carries the names, labels and values Prometheus sees. Counters go as
cumulative monotonic sums, gauges as gauges, histograms as cumulative histograms with
explicit bounds.

Why not the SDK's own instruments: they would hold a second copy of every metric, and the
SDK's Python API has no hook to feed it data it did not record itself.
"""

from __future__ import annotations

import logging
import os
import threading
import time

from opentelemetry.sdk.metrics.export import (
    AggregationTemporality,
    Gauge,
    Histogram,
    HistogramDataPoint,
    Metric,
    MetricExporter,
    MetricsData,
    NumberDataPoint,
    ResourceMetrics,
    ScopeMetrics,
    Sum,
)
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.util.instrumentation import InstrumentationScope
from prometheus_client.registry import Collector, CollectorRegistry

log = logging.getLogger(__name__)

SCOPE = InstrumentationScope("selfspec")
DEFAULT_INTERVAL_MS = 60_000
_CUMULATIVE = AggregationTemporality.CUMULATIVE


def configured() -> bool:
    """Whether the environment asks for metrics by OTLP."""
    if os.environ.get("OTEL_METRICS_EXPORTER", "otlp").strip().lower() == "none":
        return False
    return bool(
        os.environ.get("OTEL_EXPORTER_OTLP_METRICS_ENDPOINT")
        or os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT")
    )


def start(registry: CollectorRegistry | Collector, service: str) -> MetricsPush | None:
    """Push `registry` as `service` (its `service.name`) when OTLP is configured."""
    if not configured():
        return None
    from opentelemetry.exporter.otlp.proto.grpc.metric_exporter import OTLPMetricExporter

    interval = float(os.environ.get("OTEL_METRIC_EXPORT_INTERVAL", DEFAULT_INTERVAL_MS)) / 1e3
    push = MetricsPush(registry, service, OTLPMetricExporter(), interval)
    push.start()
    return push


class MetricsPush:
    """Sends a registry's metrics through an exporter every `interval` seconds."""

    def __init__(
        self,
        registry: CollectorRegistry | Collector,
        service: str,
        exporter: MetricExporter,
        interval: float,
    ) -> None:
        self.registry = registry
        self.exporter = exporter
        self.interval = interval
        self.resource = Resource.create({"service.name": service, "process.pid": os.getpid()})
        self.start_ns = time.time_ns()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="otlp-metrics", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        """Stop the thread after one last push, so the final counts are not lost."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=self.interval + 10)
        self.exporter.shutdown()

    def push(self) -> bool:
        data = metrics_data(self.registry, self.resource, self.start_ns)
        result = self.exporter.export(data, timeout_millis=10_000)
        return result.name == "SUCCESS"

    def _loop(self) -> None:
        while True:
            stopping = self._stop.wait(self.interval)
            try:
                if not self.push():
                    log.warning("OTLP metrics export failed; trying again in %.0f s", self.interval)
            except Exception:  # a broken collector must never take the component down
                log.exception("OTLP metrics export raised")
            if stopping:
                return


def metrics_data(
    registry: CollectorRegistry | Collector, resource: Resource, start_ns: int
) -> MetricsData:
    """What `registry` holds now, as the SDK's OTLP data model."""
    now = time.time_ns()
    metrics = [m for family in registry.collect() if (m := _metric(family, start_ns, now))]
    scope = ScopeMetrics(scope=SCOPE, metrics=metrics, schema_url="")
    return MetricsData(resource_metrics=[ResourceMetrics(resource, [scope], schema_url="")])


def _metric(family, start_ns: int, now: int) -> Metric | None:
    if family.type == "counter":
        points = _points(family, "_total", start_ns, now)
        data = Sum(points, aggregation_temporality=_CUMULATIVE, is_monotonic=True)
    elif family.type in ("gauge", "unknown"):
        data = Gauge(_points(family, "", start_ns, now))
    elif family.type == "histogram":
        data = Histogram(_histogram_points(family, start_ns, now), _CUMULATIVE)
    else:  # summaries and info: none of ours
        return None
    if not data.data_points:
        return None
    return Metric(family.name, family.documentation, family.unit or "", data)


def _points(family, suffix: str, start_ns: int, now: int) -> list[NumberDataPoint]:
    return [
        NumberDataPoint(dict(s.labels), start_ns, now, s.value)
        for s in family.samples
        if s.name == family.name + suffix
    ]


def _histogram_points(family, start_ns: int, now: int) -> list[HistogramDataPoint]:
    """Prometheus buckets are cumulative (`le`); OTLP wants the count in each bucket."""
    series: dict[tuple, dict] = {}
    for s in family.samples:
        labels = {k: v for k, v in s.labels.items() if k != "le"}
        row = series.setdefault(tuple(sorted(labels.items())), {"buckets": []})
        suffix = s.name.removeprefix(family.name)
        if suffix == "_bucket":
            row["buckets"].append((float(s.labels["le"]), s.value))
        elif suffix in ("_count", "_sum"):
            row[suffix] = s.value
    points = []
    for labels, row in series.items():
        buckets = sorted(row["buckets"])
        cumulative = [n for _, n in buckets]
        counts = [int(n - prev) for n, prev in zip(cumulative, [0.0, *cumulative], strict=False)]
        points.append(
            HistogramDataPoint(
                attributes=dict(labels),
                start_time_unix_nano=start_ns,
                time_unix_nano=now,
                count=int(row.get("_count", cumulative[-1] if cumulative else 0)),
                sum=row.get("_sum", 0.0),
                bucket_counts=counts,
                explicit_bounds=[le for le, _ in buckets if le != float("inf")],
                min=None,  # unknown: Prometheus keeps no extremes
                max=None,
            )
        )
    return points
