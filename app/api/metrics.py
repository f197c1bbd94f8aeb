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
EVENTS_PER_COMMIT = Histogram(
    "recsys_events_per_commit",
    "Events written by one group commit of POST /v1/events (the requests that arrived during the last one)",
    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192),
)
EVENTS_COMMIT_SECONDS = Histogram(
    "recsys_events_commit_seconds",
    "Duration of one group commit of events: the inserts and the durable commit (not the wait for the SQLite write lock)",
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5),
)
EVENTS_QUEUE_DEPTH = Gauge(
    "recsys_events_queue_depth",
    "Events waiting for a group commit (summed over workers)",
    multiprocess_mode="livesum",
)
EVENTS_REFUSED = Counter(
    "recsys_events_refused_total",
    "POST /v1/events requests not acknowledged, by error code (events_queue_full, commit_timeout, "
    "database_unavailable, shutting_down, rejected_by_database)",
    ["code"],
)
SQLITE_CHECKPOINT_SECONDS = Histogram(
    "recsys_sqlite_checkpoint_seconds",
    "Duration of one WAL checkpoint pass on SQLite, by pass: background (beside the writers) or under_lock "
    "(event commits wait for it; taken only when the WAL has grown past 16,000 pages)",
    ["pass"],
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5),
)
SQLITE_WAL_FRAMES = Gauge(
    "recsys_sqlite_wal_frames",
    "Frames (pages) in the SQLite WAL after the last checkpoint pass of a worker",
    multiprocess_mode="livemax",
)
RECENT_VIEW_READY = Gauge(
    "recsys_recent_events_view_ready",
    "1 when this worker's in-memory view of events since the model's watermark answers; 0 while it is "
    "(re)built after a swap, or after an overflow: recommendations then read the user's events from the database",
    multiprocess_mode="liveall",
)

RECENT_VIEW_LAG = Histogram(
    "recsys_recent_events_view_lag_seconds",
    "On each read of the events table by a worker's recent-events view: time since its previous read "
    "began, the longest an event written through another worker or process waited to reach this worker's "
    "recommendations (the poll interval plus the read)",
    buckets=(0.1, 0.25, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0, 30.0),
)
RECENT_VIEW_READ_AT = Gauge(
    "recsys_recent_events_view_read_timestamp_seconds",
    "Unix time at which the last successful read of the recent-events view began (the stalest live "
    "worker's): events committed before it shape every worker's lists; time() minus this is the lag now",
    multiprocess_mode="livemin",
)


def render() -> tuple[bytes, str]:
    """The exposition text: every worker's metrics in multiprocess mode, this process's otherwise."""
    if MULTIPROC:
        registry = CollectorRegistry()
        _mp.MultiProcessCollector(registry)
        return generate_latest(registry), CONTENT_TYPE_LATEST
    return generate_latest(), CONTENT_TYPE_LATEST
