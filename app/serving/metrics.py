"""Prometheus metrics of the serving core: the served model, its index, the lists served, impressions.

Defined on the default registry like the HTTP layer's (``app.api.metrics``), which renders them all,
aggregated over workers in multiprocess mode.
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge

MODEL_INFO = Gauge(
    "recsys_model_info",
    "1 for the model version this worker serves",
    ["version"],
    multiprocess_mode="liveall",
)
MODEL_LOADS = Counter("recsys_model_loads_total", "Checkpoint load attempts", ["outcome"])
RECOMMENDATIONS = Counter("recsys_recommendations_total", "Recommendation lists served", ["source"])
SOURCES = ("model", "model+recent", "fold_in", "popular")
FALLBACK_SOURCES = frozenset({"fold_in", "popular"})  # not the user's own model vector
RECOMMENDATIONS_BY_SOURCE = {s: RECOMMENDATIONS.labels(s) for s in SOURCES}
FALLBACKS = Counter("recsys_fallbacks_total", "Lists served by a fallback (fold_in or popular)", ["source"])
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
