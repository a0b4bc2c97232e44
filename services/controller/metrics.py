"""Prometheus metrics of a controller, read from it on each scrape."""

from __future__ import annotations

from prometheus_client import REGISTRY, start_http_server
from prometheus_client.core import GaugeMetricFamily

from services.common import metrics_push


class ControllerCollector:
    def __init__(self, controller) -> None:
        self.controller = controller

    def collect(self):
        c = self.controller
        leader = GaugeMetricFamily("selfspec_controller_is_leader", "1 if this controller leads")
        leader.add_metric([], 1.0 if c.is_leader else 0.0)
        yield leader
        version = GaugeMetricFamily(
            "selfspec_controller_config_version", "newest config version written", labels=["model"]
        )
        rounds = GaugeMetricFamily(
            "selfspec_controller_search_round", "skip-set search round", labels=["model"]
        )
        windows = GaugeMetricFamily(
            "selfspec_controller_telemetry_windows", "telemetry windows read", labels=["model"]
        )
        for model, state in list(c.models.items()):
            version.add_metric([model], float(c.published))
            windows.add_metric([model], float(state.evidence.windows))
            if state.search is not None:
                rounds.add_metric([model], float(state.search.round))
        yield from (version, rounds, windows)


def export_metrics(controller, port: int | None) -> metrics_push.MetricsPush | None:
    """Serve /metrics on `port` (if given), and push by OTLP when that is configured."""
    REGISTRY.register(ControllerCollector(controller))
    if port is not None:
        start_http_server(port)
    return metrics_push.start(REGISTRY, "selfspec-controller")
