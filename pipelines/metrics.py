"""Prometheus metrics of the live path and the scoring service: every metric defined once, here.

The ingester (`platform stream`) and the scoring service (`platform serve`) each answer `GET /metrics`
with :func:`exposition`. Counters and histograms are incremented where the work happens (a few
pre-bound children, each about a microsecond); what the processes already hold (the loaded model
versions, the canary's rollout state) is read only when Prometheus scrapes (:class:`_ModelCollector`),
so it costs the request path nothing.

`platform stream` ingests in one process and scores in another (see `pipelines.streaming.live`); both
count into prometheus_client's multiprocess directory (`PROMETHEUS_MULTIPROC_DIR`, which
`platform stream` sets before anything imports prometheus_client), and whichever process serves HTTP
reports the sum. Every other process keeps its metrics in memory (prometheus_client's default).

Names follow Prometheus' conventions: `platform_` prefix, `_total` on counters (added by the client),
`_seconds` for durations. Grafana's dashboard (compose/grafana/dashboards/platform.json) queries
these names; tests/stack/test_compose.py checks that every name it queries is defined here.
"""

from __future__ import annotations

import os
import time
import weakref
from bisect import bisect_left
from collections.abc import Awaitable, Callable
from typing import Any

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    REGISTRY,
    CollectorRegistry,
    Counter,
    Histogram,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

disable_created_metrics()  # one `_created` series per counter is noise on every dashboard

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"

# -- the live path (labels: dataset) ---------------------------------------------------------------
READINGS_RECEIVED = Counter(
    "platform_stream_readings_received", "MQTT messages the ingester received (readings and refusals)", ["dataset"]
)
READINGS_COMMITTED = Counter(
    "platform_stream_readings_committed", "Readings committed to bronze (each exactly once)", ["dataset"]
)
READINGS_QUARANTINED = Counter(
    "platform_stream_readings_quarantined",
    "Messages refused and quarantined, by the rule they broke",
    ["dataset", "rule"],
)
READINGS_DUPLICATE = Counter(
    "platform_stream_readings_duplicate", "Redelivered readings bronze already held (dropped)", ["dataset"]
)
COMMIT_SECONDS = Histogram(
    "platform_stream_commit_seconds",
    "Time to commit one micro-batch to bronze (data files and manifests)",
    ["dataset"],
    buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0),
)
INGEST_LAG_SECONDS = Histogram(
    "platform_stream_ingest_lag_seconds",
    "From a batch's first message received to its bronze commit (batching plus commit)",
    ["dataset"],
    buckets=(0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0),
)
COMMIT_FAILURES = Counter("platform_stream_commit_failures", "Bronze commits that failed and were retried", ["dataset"])
READINGS_SCORED = Counter("platform_stream_readings_scored", "Readings scored online by the champion", ["dataset"])
ALERTS_PUBLISHED = Counter(
    "platform_stream_alerts_published", "Anomaly alerts published on alerts/<dataset>/<device>", ["dataset"]
)
SCORING_FAILURES = Counter(
    "platform_stream_scoring_failures", "Online scoring passes that failed (readings still committed)", ["dataset"]
)

# -- the scoring service (labels: endpoint, status): counted in plain Python, see instrumented() ----
SCORING_REQUESTS = "platform_scoring_requests"  # _total: requests by endpoint and HTTP status
SCORING_LATENCY = "platform_scoring_latency_seconds"  # histogram by endpoint
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)

# Scrape-time metrics (no cost on any request path): see _ModelCollector.
MODEL_INFO = "platform_model_version_info"
CANARY_WEIGHT = "platform_canary_weight_percent"
CANARY_STAGE = "platform_canary_stage_info"


class IngestMetrics:
    """The ingester's counters for one dataset, children bound once (a `.labels()` lookup per message
    would cost more than the increment)."""

    def __init__(self, dataset: str):
        self.dataset = dataset
        self.received = READINGS_RECEIVED.labels(dataset)
        self.committed = READINGS_COMMITTED.labels(dataset)
        self.duplicates = READINGS_DUPLICATE.labels(dataset)
        self.commit_seconds = COMMIT_SECONDS.labels(dataset)
        self.ingest_lag = INGEST_LAG_SECONDS.labels(dataset)
        self.commit_failures = COMMIT_FAILURES.labels(dataset)
        self._quarantined: dict[str, Any] = {}

    def quarantined(self, rule: str) -> None:
        child = self._quarantined.get(rule)
        if child is None:
            child = self._quarantined[rule] = READINGS_QUARANTINED.labels(self.dataset, rule)
        child.inc()

    def committed_batch(self, rows: int, commit_seconds: float, first_received_ns: int) -> None:
        self.committed.inc(rows)
        self.commit_seconds.observe(commit_seconds)
        if first_received_ns:
            self.ingest_lag.observe(max(0.0, time.time() - first_received_ns / 1e9))


class ScorerMetrics:
    """The online scorer's counters for one dataset."""

    def __init__(self, dataset: str):
        self.scored = READINGS_SCORED.labels(dataset)
        self.alerts = ALERTS_PUBLISHED.labels(dataset)
        self.failures = SCORING_FAILURES.labels(dataset)


# -- scrape-time collector: model versions and canary stage ------------------------------------------
_MODEL_SOURCES: weakref.WeakSet = weakref.WeakSet()


def watch_models(manager: Any) -> None:
    """Report `manager`'s loaded versions and rollout state at every scrape (a
    `pipelines.serving.models.ModelManager`, or anything with `model_name`, `models` and `rollout`)."""
    _MODEL_SOURCES.add(manager)


class _ModelCollector:
    def collect(self):
        info = GaugeMetricFamily(
            MODEL_INFO, "The model version loaded per role (1 per loaded version)", labels=["model", "role", "version"]
        )
        weight = GaugeMetricFamily(
            CANARY_WEIGHT, "Percent of devices the canary routes to the challenger", labels=["model"]
        )
        stage = GaugeMetricFamily(
            CANARY_STAGE,
            "The canary rollout's state and step (1 per model)",
            labels=["model", "status", "step", "shadow", "champion_version", "challenger_version"],
        )
        seen: set[tuple[str, str, str]] = set()
        for manager in list(_MODEL_SOURCES):
            name = str(getattr(manager, "model_name", "") or "")
            for role, model in dict(getattr(manager, "models", {}) or {}).items():
                if model is not None and (name, role, str(model.version)) not in seen:
                    seen.add((name, role, str(model.version)))
                    info.add_metric([name, role, str(model.version)], 1.0)
            rollout = getattr(manager, "rollout", None)
            if rollout is not None and (name, "", "rollout") not in seen:
                seen.add((name, "", "rollout"))
                weight.add_metric([name], float(rollout.weight if rollout.active else 0))
                stage.add_metric(
                    [
                        name,
                        rollout.status,
                        rollout.step_name or "none",
                        rollout.shadow or "none",
                        str(rollout.champion_version or ""),
                        str(rollout.challenger_version or ""),
                    ],
                    1.0,
                )
        yield info
        yield weight
        yield stage

    def describe(self):
        return []  # names are fixed, values only known at scrape time


_MODELS = _ModelCollector()
REGISTRY.register(_MODELS)


class _EndpointStats:
    """One instrumented endpoint's counts: plain ints and a float, touched only by the event loop's
    thread (Starlette runs async endpoints there), so no lock; read at scrape time."""

    __slots__ = ("endpoint", "buckets", "latency_sum", "by_status")

    def __init__(self, endpoint: str):
        self.endpoint = endpoint
        self.buckets = [0] * (len(LATENCY_BUCKETS) + 1)  # the last one: above every bound (+Inf)
        self.latency_sum = 0.0
        self.by_status: dict[int, int] = {}


_ENDPOINTS: list[_EndpointStats] = []


def instrumented(handler: Callable[[Any], Awaitable[Any]], endpoint: str) -> Callable[[Any], Awaitable[Any]]:
    """`handler` (an async Starlette endpoint) counting its requests by status and timing them.

    A request costs a bisect, two additions and a dict update (well under a microsecond on the
    reference machine): prometheus_client's own Histogram.observe takes a lock and walks every
    bucket; here the histogram is built from these counts when Prometheus scrapes."""
    stats = _EndpointStats(endpoint)
    _ENDPOINTS.append(stats)
    buckets, by_status = stats.buckets, stats.by_status

    async def wrapped(request):
        started = time.perf_counter()
        status = 500  # an exception becomes Starlette's 500
        try:
            response = await handler(request)
            status = response.status_code
            return response
        finally:
            elapsed = time.perf_counter() - started
            buckets[bisect_left(LATENCY_BUCKETS, elapsed)] += 1
            stats.latency_sum += elapsed
            by_status[status] = by_status.get(status, 0) + 1

    wrapped.__name__ = getattr(handler, "__name__", endpoint)
    return wrapped


class _RequestCollector:
    def collect(self):
        requests = CounterMetricFamily(
            SCORING_REQUESTS,
            "Requests to the scoring service by endpoint and HTTP status",
            labels=["endpoint", "status"],
        )
        latency = HistogramMetricFamily(
            SCORING_LATENCY, "Time from a request's arrival in its handler to its answer", labels=["endpoint"]
        )
        merged: dict[str, tuple[list[int], float, dict[int, int]]] = {}
        for stats in list(_ENDPOINTS):  # several apps in one process (tests) add up per endpoint
            counts, total, statuses = merged.setdefault(stats.endpoint, ([0] * len(stats.buckets), 0.0, {}))
            for i, n in enumerate(stats.buckets):
                counts[i] += n
            merged[stats.endpoint] = (counts, total + stats.latency_sum, statuses)
            for status, n in dict(stats.by_status).items():
                statuses[status] = statuses.get(status, 0) + n
        for endpoint, (counts, total, statuses) in merged.items():
            cumulative, running = [], 0
            for bound, n in zip((*(repr(float(b)) for b in LATENCY_BUCKETS), "+Inf"), counts, strict=True):
                running += n
                cumulative.append((bound, running))
            latency.add_metric([endpoint], cumulative, sum_value=total)
            for status, n in sorted(statuses.items()):
                requests.add_metric([endpoint, str(status)], n)
        yield requests
        yield latency

    def describe(self):
        return []


_REQUESTS = _RequestCollector()
REGISTRY.register(_REQUESTS)


def metric_names() -> set[str]:
    """Every metric family this module exports (as Prometheus names them, `_total` on counters)."""
    names = {MODEL_INFO, CANARY_WEIGHT, CANARY_STAGE, SCORING_REQUESTS + "_total", SCORING_LATENCY}
    for value in globals().values():
        if isinstance(value, Counter):
            names.add(value._name + "_total")
        elif isinstance(value, Histogram):
            names.add(value._name)
    return names


def exposition() -> tuple[bytes, str]:
    """The text a `/metrics` endpoint answers, and its content type."""
    path = os.environ.get(MULTIPROC_ENV)
    if path:
        from prometheus_client import multiprocess

        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry, path)
        registry.register(_MODELS)
        registry.register(_REQUESTS)
        return generate_latest(registry), CONTENT_TYPE_LATEST
    return generate_latest(REGISTRY), CONTENT_TYPE_LATEST


async def metrics_endpoint(request: Any):
    """`GET /metrics` for a Starlette app."""
    from starlette.responses import Response

    body, content_type = exposition()
    return Response(body, headers={"Content-Type": content_type})
