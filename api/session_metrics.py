"""Session figures for /metrics: open sessions per tier (each holds a container) and endings by reason."""

from __future__ import annotations

from collections.abc import Iterable

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from pool.model.sessions import SessionFigures


class _SessionFamilies(Collector):
    def __init__(self, figures: SessionFigures) -> None:
        self.figures = figures

    def collect(self) -> Iterable[Metric]:
        open_now = GaugeMetricFamily("warmpool_sessions", "Open sessions, each holding a container of its tier",
                                     labels=["tier"])
        for tier, count in self.figures.open_by_tier:
            open_now.add_metric([tier], count)
        ended = CounterMetricFamily("warmpool_sessions_ended", "Sessions ended since start, by reason",
                                    labels=["reason"])
        for reason, count in self.figures.ended_by_reason:
            ended.add_metric([reason], count)
        return [open_now, ended]


def render_session_metrics(figures: SessionFigures) -> bytes:
    """The figures in Prometheus's text format (a registry of this scrape only)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_SessionFamilies(figures))
    return generate_latest(registry)
