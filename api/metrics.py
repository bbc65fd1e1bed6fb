"""Prometheus metrics at /metrics, in a registry of the app's own (several apps in one process never clash).

Pool figures are a snapshot the dispatcher takes at scrape time from the pool's own counters
(pool/engine/tier_pool.py, pool/model/stats.py), so the task path carries no metrics library; only the
end-to-end request time is observed per request, by a plain ASGI middleware.
"""

from __future__ import annotations

import time
from collections.abc import Iterable

from fastapi import FastAPI, Request
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from api.session_metrics import render_session_metrics
from pool.model.snapshots import HistogramSnapshot, PoolsSnapshot, TierCounters

REQUEST_BOUNDS_S = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


def _histogram(family: HistogramMetricFamily, labels: list[str], histogram: HistogramSnapshot) -> None:
    family.add_metric(labels, [(le, float(n)) for le, n in histogram.buckets], histogram.sum_s)


def pool_families(pools: PoolsSnapshot) -> Iterable[Metric]:
    """Per-tier gauges, counters and histograms, and the engine's and ledger's figures, from one snapshot."""
    containers = GaugeMetricFamily("warmpool_containers", "Containers of each tier by state", labels=["tier", "state"])
    target = GaugeMetricFamily("warmpool_warm_target", "Idle containers each tier aims to keep warm now",
                               labels=["tier"])
    min_idle = GaugeMetricFamily("warmpool_min_idle", "Operator-set idle floor per tier", labels=["tier"])
    max_size = GaugeMetricFamily("warmpool_max_size", "Operator-set container ceiling per tier", labels=["tier"])
    waiting = GaugeMetricFamily("warmpool_lease_waiters", "Leases waiting for a container", labels=["tier"])
    leases = CounterMetricFamily("warmpool_leases", "Leases asked for", labels=["tier"])
    timeouts = CounterMetricFamily("warmpool_lease_timeouts", "Leases that found no container in time",
                                   labels=["tier"])
    starts = CounterMetricFamily("warmpool_container_starts", "Containers started and handshaken", labels=["tier"])
    start_failures = CounterMetricFamily("warmpool_container_start_failures", "Container starts that failed",
                                         labels=["tier"])
    replaced = CounterMetricFamily("warmpool_container_replacements",
                                   "Containers removed by the pool, by reason (scaled_down ones are not "
                                   "started again)", labels=["tier", "reason"])
    lease_wait = HistogramMetricFamily("warmpool_lease_wait_seconds", "Wait for a granted lease", labels=["tier"])
    run_time = HistogramMetricFamily("warmpool_task_run_seconds", "Task run time as the runner measured it",
                                     labels=["tier", "status"])
    for tier in pools.tiers:
        name, counters = tier.name, tier.counters or TierCounters()
        for state, count in (("idle", tier.idle), ("busy", tier.busy), ("starting", tier.starting)):
            containers.add_metric([name, state], count)
        target.add_metric([name], tier.target_idle or 0)
        min_idle.add_metric([name], tier.min_idle)
        max_size.add_metric([name], tier.max_size)
        waiting.add_metric([name], tier.waiting or 0)
        leases.add_metric([name], counters.leases)
        timeouts.add_metric([name], counters.lease_timeouts)
        starts.add_metric([name], counters.created)
        start_failures.add_metric([name], counters.start_failures)
        for reason, count in counters.replaced:
            replaced.add_metric([name, reason], count)
        if counters.lease_wait is not None:
            _histogram(lease_wait, [name], counters.lease_wait)
        for status, histogram in counters.run_times:
            _histogram(run_time, [name, status], histogram)
    yield from (containers, target, min_idle, max_size, waiting, leases, timeouts, starts, start_failures,
                replaced, lease_wait, run_time)
    up = GaugeMetricFamily("warmpool_docker_up", "1 when the Docker engine answers")
    up.add_metric([], 1 if pools.docker_ok else 0)
    yield up
    errors = CounterMetricFamily("warmpool_docker_api_errors", "Failed Docker API calls, by operation",
                                 labels=["operation"])
    for operation, count in pools.docker_api_errors:
        errors.add_metric([operation], count)
    yield errors
    capacity = pools.capacity
    for name, doc, value in (
        ("warmpool_capacity_cpu_budget", "CPUs the tiers may hold (host cpus x overcommit)", capacity.cpu_budget),
        ("warmpool_capacity_cpu_held", "CPUs held by live containers", capacity.cpu_held),
        ("warmpool_capacity_ram_bytes", "Memory the tiers may hold", capacity.ram_bytes),
        ("warmpool_capacity_ram_held_bytes", "Memory held by live containers", capacity.ram_held_bytes),
        ("warmpool_capacity_gpus", "GPUs in the inventory", len(capacity.gpu_ids)),
        ("warmpool_capacity_gpus_free", "GPUs held by no container", len(capacity.gpus_free)),
    ):
        gauge = GaugeMetricFamily(name, doc)
        gauge.add_metric([], value)
        yield gauge


def with_label(families: Iterable[Metric], name: str, value: str) -> Iterable[Metric]:
    """The families with one more label on every sample (a worker's figures carry `worker`)."""
    for family in families:
        family.samples = [sample._replace(labels={name: value, **sample.labels}) for sample in family.samples]
        yield family


def render_pools(pools: PoolsSnapshot, worker: str | None = None) -> bytes:
    """The pools' figures of one scrape, in Prometheus's text format (labelled by `worker` when given)."""
    families = pool_families(pools)
    scrape = CollectorRegistry(auto_describe=False)
    scrape.register(_Families(families if worker is None else with_label(families, "worker", worker)))
    return generate_latest(scrape)


class _Families(Collector):
    """Hands prometheus_client the families of one scrape."""

    def __init__(self, families: Iterable[Metric]) -> None:
        self.families = list(families)

    def collect(self) -> Iterable[Metric]:
        return self.families


class RequestTimer:
    """Pure ASGI middleware observing each HTTP request's end-to-end time by method, route and status."""

    def __init__(self, app: ASGIApp, histogram: Histogram) -> None:
        self.app = app
        self.histogram = histogram

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500  # what the client sees when the app fails before answering

        async def timed_send(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, timed_send)
        finally:
            route = getattr(scope.get("route"), "path", None) or "unmatched"  # the template bounds cardinality
            self.histogram.labels(scope["method"], route, str(status)).observe(time.perf_counter() - started)


def install_metrics(app: FastAPI) -> CollectorRegistry:
    """Give the app its own registry, the request timer, and the /metrics route.

    The pools' figures come from the dispatcher at each scrape, as one frozen snapshot, rendered into a
    registry of that scrape only; the app's registry keeps what the app itself observes."""
    registry = CollectorRegistry()
    request_seconds = Histogram("warmpool_request_duration_seconds", "HTTP request time, end to end",
                                ["method", "route", "status"], registry=registry, buckets=REQUEST_BOUNDS_S)
    app.state.metrics_registry = registry
    app.add_middleware(RequestTimer, histogram=request_seconds)

    async def metrics(request: Request) -> Response:
        """Prometheus metrics of this service."""
        dispatcher = getattr(request.app.state, "dispatcher", None)  # absent before the lifespan started
        pools = await dispatcher.figures() if dispatcher is not None else None
        sessions = render_session_metrics(await dispatcher.session_figures()) if dispatcher is not None else b""
        body = generate_latest(registry) + sessions
        if pools is not None:
            body = render_pools(pools) + body
        return Response(body, media_type=CONTENT_TYPE_LATEST)

    app.add_api_route("/metrics", metrics, methods=["GET"], response_class=Response, tags=["health"],
                      responses={200: {"description": "Prometheus text exposition format",
                                       "content": {"text/plain": {"schema": {"type": "string"}}}}})
    return registry
