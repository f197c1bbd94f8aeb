"""Prometheus metrics, per route template, in multiprocess mode when several workers share a port.

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
MODEL_INFO = Gauge(
    "recsys_model_info",
    "1 for the model version this worker serves",
    ["version"],
    multiprocess_mode="liveall",
)
MODEL_LOADS = Counter("recsys_model_loads_total", "Checkpoint load attempts", ["outcome"])
RECOMMENDATIONS = Counter("recsys_recommendations_total", "Recommendation lists served", ["source"])
RECOMMENDATIONS_BY_SOURCE = {s: RECOMMENDATIONS.labels(s) for s in ("model", "fold_in", "popular")}
FALLBACKS = Counter("recsys_fallbacks_total", "Lists served by a fallback (fold_in or popular)", ["source"])
EVENTS_WRITTEN = Counter("recsys_events_written_total", "Events committed (new, not duplicates)")
EVENTS_DUPLICATE = Counter("recsys_events_duplicate_total", "Events ignored as already recorded")
INDEX_BUILDING = Gauge(
    "recsys_serving_index_building",
    "1 while this worker builds its approximate index or its top lists (plain search serves meanwhile)",
    multiprocess_mode="liveall",
)
INDEX_APPROXIMATE = Gauge(
    "recsys_serving_index_approximate",
    "1 when unfiltered searches use an approximate index",
    multiprocess_mode="liveall",
)
INDEX_RECALL = Gauge(
    "recsys_serving_index_recall",
    "Recall@10 of the serving index against exact search on a sample of users (1: exact search)",
    multiprocess_mode="liveall",
)
TOP_LISTS = Gauge(
    "recsys_serving_top_lists",
    "1 when model users' recommendations come from lists precomputed at load (0 while they are built)",
    multiprocess_mode="liveall",
)
RECENT_VIEW_READY = Gauge(
    "recsys_recent_events_view_ready",
    "1 when this worker's in-memory view of events since the model's watermark answers; 0 while it is "
    "(re)built after a swap, or after an overflow: recommendations then read the user's events from the database",
    multiprocess_mode="liveall",
)
IMPRESSIONS_DROPPED = Counter("recsys_impressions_dropped_total", "Served lists not logged (queue full)")


def set_model_version(old: str | None, new: str) -> None:
    if old is not None and old != new:
        MODEL_INFO.labels(version=old).set(0)
    MODEL_INFO.labels(version=new).set(1)


def set_serving_index(building: bool, approximate: bool, recall: float, top_lists: bool) -> None:
    INDEX_BUILDING.set(int(building))
    TOP_LISTS.set(int(top_lists))
    INDEX_APPROXIMATE.set(int(approximate))
    INDEX_RECALL.set(recall)


def render() -> tuple[bytes, str]:
    """The exposition text: every worker's metrics in multiprocess mode, this process's otherwise."""
    if MULTIPROC:
        registry = CollectorRegistry()
        _mp.MultiProcessCollector(registry)
        return generate_latest(registry), CONTENT_TYPE_LATEST
    return generate_latest(), CONTENT_TYPE_LATEST
