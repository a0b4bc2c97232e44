"""Metrics by OTLP: a Prometheus registry pushed over real gRPC to a loopback receiver."""

from __future__ import annotations

import pytest
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from waiting import wait_for

from services.common import metrics_push


def arrived(receiver, service: str, name: str):
    """The newest `name` metric `service` pushed to `receiver`, once one has arrived."""
    return wait_for(lambda: receiver.latest(service).get(name), what=f"{name} from {service}")


def test_configured_by_the_standard_variables(monkeypatch):
    for var in ("OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_METRICS_ENDPOINT"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.delenv("OTEL_METRICS_EXPORTER", raising=False)
    assert not metrics_push.configured()
    assert metrics_push.start(CollectorRegistry(), "x") is None
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", "http://127.0.0.1:4317")
    assert metrics_push.configured()
    monkeypatch.setenv("OTEL_METRICS_EXPORTER", "none")
    assert not metrics_push.configured()


def test_counters_gauges_and_histograms_arrive_with_their_values(monkeypatch, otlp_receiver):
    for key, value in otlp_receiver.env(interval_ms=100).items():
        monkeypatch.setenv(key, value)
    registry = CollectorRegistry()
    tokens = Counter("vllm:generation_tokens", "Tokens generated.", registry=registry)
    running = Gauge("vllm:num_requests_running", "Running.", ["model_name"], registry=registry)
    ttft = Histogram(
        "vllm:time_to_first_token_seconds", "TTFT.", buckets=(0.1, 1.0), registry=registry
    )
    tokens.inc(7)
    running.labels("default").set(3)
    for seconds in (0.05, 0.5, 0.7, 4.0):
        ttft.observe(seconds)

    push = metrics_push.start(registry, "selfspec-test")
    try:
        counter = arrived(otlp_receiver, "selfspec-test", "vllm:generation_tokens")
        assert counter.sum.is_monotonic and counter.sum.data_points[0].as_double == 7
        gauge = arrived(otlp_receiver, "selfspec-test", "vllm:num_requests_running")
        (point,) = gauge.gauge.data_points
        assert point.as_double == 3
        assert {a.key: a.value.string_value for a in point.attributes} == {"model_name": "default"}
        hist = arrived(otlp_receiver, "selfspec-test", "vllm:time_to_first_token_seconds")
        (point,) = hist.histogram.data_points
        assert list(point.explicit_bounds) == [0.1, 1.0]
        assert list(point.bucket_counts) == [1, 2, 1]  # per bucket, not cumulative
        assert point.count == 4 and point.sum == pytest.approx(5.25)

        tokens.inc(5)  # later pushes carry the running total

        def total_is_12():
            c = otlp_receiver.latest("selfspec-test")["vllm:generation_tokens"]
            return c.sum.data_points[0].as_double == 12

        wait_for(total_is_12, what="the new count")
    finally:
        push.stop()


@pytest.mark.timeout(120)  # a guard against a push that never gives up, not a timing check
def test_an_unreachable_collector_never_raises():
    """A push to a collector nobody listens at reports failure; it neither raises nor
    waits forever."""
    registry = CollectorRegistry()
    Counter("c", "c", registry=registry).inc()
    from opentelemetry.exporter.otlp.proto.grpc.metric_exporter import OTLPMetricExporter

    exporter = OTLPMetricExporter(endpoint="http://127.0.0.1:9", insecure=True, timeout=1)
    push = metrics_push.MetricsPush(registry, "selfspec-test", exporter, interval=60)
    assert push.push() is False
