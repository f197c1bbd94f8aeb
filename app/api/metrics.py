"""Prometheus metrics of the HTTP layer and ingestion, and the rendering of every metric of the process.

The serving core's metrics (model, index, lists served, impressions) live in ``app.serving.metrics``, on
the same default registry.

With ``uvicorn --workers N`` each worker is a process; ``app.api.server.run`` then sets
PROMETHEUS_MULTIPROC_DIR so /metrics aggregates all workers instead of showing one at random.
"""

from __future__ import annotations

import os

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client import multiprocess as _mp

MULTIPROC = bool(os.environ.get("PROMETHEUS_MULTIPROC_DIR"))

REQUESTS = Counter("recsys_http_requests_total", "HTTP requests", ["method", "route", "status"])
LATENCY = Histogram(
    "recsys_http_request_duration_seconds",
    "Time from request start to the last response byte",
    ["method", "route"],
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5),
)
EVENTS_WRITTEN = Counter("recsys_events_written_total", "Events committed (new, not duplicates)")
EVENTS_DUPLICATE = Counter("recsys_events_duplicate_total", "Events ignored as already recorded")
RECENT_VIEW_READY = Gauge(
    "recsys_recent_events_view_ready",
    "1 when this worker's in-memory view of events since the model's watermark answers; 0 while it is "
    "(re)built after a swap, or after an overflow: recommendations then read the user's events from the database",
    multiprocess_mode="liveall",
)


def render() -> tuple[bytes, str]:
    """The exposition text: every worker's metrics in multiprocess mode, this process's otherwise."""
    if MULTIPROC:
        registry = CollectorRegistry()
        _mp.MultiProcessCollector(registry)
        return generate_latest(registry), CONTENT_TYPE_LATEST
    return generate_latest(), CONTENT_TYPE_LATEST
