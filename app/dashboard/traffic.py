"""Request rate and latency percentiles per route, and event ingestion's group commits, read from the
service's own Prometheus metrics.

The counters are cumulative (summed over workers in multiprocess mode), so a rate needs two readings:
each overview keeps a reading, and the next one within WINDOW compares against the oldest kept one. With
no earlier reading the figures cover the time since this worker started. Percentiles are interpolated
inside histogram buckets, as Prometheus's ``histogram_quantile`` does.
"""

from __future__ import annotations

import math
import threading
import time
from collections import deque
from dataclasses import dataclass, field

from prometheus_client.parser import text_string_to_metric_families

from app.api import metrics

REQUESTS = "recsys_http_requests"
LATENCY = "recsys_http_request_duration_seconds"
# event ingestion (app/api/ingest.py): sample name -> key in Reading.ingest
INGEST = {"recsys_events_written_total": "written", "recsys_events_duplicate_total": "duplicates",
          "recsys_events_per_commit_count": "commits", "recsys_events_per_commit_sum": "grouped"}
COMMIT = "recsys_events_commit_seconds_bucket"
REFUSED = "recsys_events_refused_total"
QUEUE = "recsys_events_queue_depth"
WINDOW = 15 * 60.0  # readings older than this are dropped
MIN_SPAN = 5.0  # a reading younger than this is too close to compare against


@dataclass
class Reading:
    at: float
    counts: dict[tuple[str, str], float] = field(default_factory=dict)  # (method, route) → requests
    errors: dict[tuple[str, str], float] = field(default_factory=dict)  # 5xx responses
    buckets: dict[tuple[str, str], dict[float, float]] = field(default_factory=dict)  # le → cumulative
    ingest: dict[str, float] = field(default_factory=dict)  # INGEST's keys, and "refused:<code>"
    commit: dict[float, float] = field(default_factory=dict)  # commit seconds: le → cumulative
    queue: float = 0.0  # events waiting for a commit now (a gauge: no difference between readings)


def read(now: float | None = None) -> Reading:
    """The current totals from /metrics' exposition text."""
    text, _ = metrics.render()
    out = Reading(time.time() if now is None else now)
    for family in text_string_to_metric_families(text.decode()):
        for s in family.samples:
            key = (s.labels.get("method", ""), s.labels.get("route", ""))
            if s.name in INGEST or s.name in (COMMIT, REFUSED, QUEUE):
                _add_ingest(out, s.name, s.labels, s.value)
            elif s.name == REQUESTS + "_total":
                out.counts[key] = out.counts.get(key, 0.0) + s.value
                if s.labels.get("status", "").startswith("5"):
                    out.errors[key] = out.errors.get(key, 0.0) + s.value
            elif s.name == LATENCY + "_bucket":
                le = float(s.labels["le"])
                per = out.buckets.setdefault(key, {})
                per[le] = per.get(le, 0.0) + s.value
    return out


def _add_ingest(out: Reading, name: str, labels: dict[str, str], value: float) -> None:
    if name == COMMIT:
        le = float(labels["le"])
        out.commit[le] = out.commit.get(le, 0.0) + value
    elif name == QUEUE:
        out.queue += value
    else:
        key = f"refused:{labels.get('code', '')}" if name == REFUSED else INGEST[name]
        out.ingest[key] = out.ingest.get(key, 0.0) + value


def _ingestion(current: Reading, base: Reading, span: float) -> dict:
    """Events written, duplicates and refusals over the window, the group commits that wrote them (their
    size and latency) and the queue now."""
    delta = {k: v - base.ingest.get(k, 0.0) for k, v in current.ingest.items()}
    commits = delta.get("commits", 0.0)
    buckets = {le: c - base.commit.get(le, 0.0) for le, c in current.commit.items()}
    p50, p99 = (quantile(q, buckets) for q in (0.5, 0.99))
    return {
        "written": int(delta.get("written", 0.0)),
        "per_second": delta.get("written", 0.0) / span,
        "duplicates": int(delta.get("duplicates", 0.0)),
        "commits": int(commits),
        "events_per_commit": delta.get("grouped", 0.0) / commits if commits else None,
        "commit_p50": None if p50 is None else p50 * 1000,
        "commit_p99": None if p99 is None else p99 * 1000,
        "refused": {k.split(":", 1)[1]: int(v) for k, v in sorted(delta.items()) if k.startswith("refused:") and v},
        "queue": int(current.queue),
    }


def quantile(q: float, cumulative: dict[float, float]) -> float | None:
    """The q-quantile of a histogram given as {upper bound: cumulative count}; None when empty."""
    bounds = sorted(cumulative)
    if not bounds or cumulative[bounds[-1]] <= 0:
        return None
    rank = q * cumulative[bounds[-1]]
    prev_bound, prev_count = 0.0, 0.0
    for b in bounds:
        count = cumulative[b]
        if count >= rank:
            if math.isinf(b):
                return prev_bound  # beyond the largest finite bucket: its bound is all we know
            inside = count - prev_count
            return prev_bound + (b - prev_bound) * ((rank - prev_count) / inside if inside else 1.0)
        prev_bound, prev_count = b, count
    return prev_bound


class Traffic:
    """Readings kept between overview pages, on this worker."""

    def __init__(self, started: float | None = None) -> None:
        self.started = time.time() if started is None else started
        self._readings: deque[Reading] = deque()
        self._lock = threading.Lock()

    def summary(self, now: float | None = None) -> dict:
        """Per route: requests, requests per second, 5xx, p50/p95/p99 latency (ms) over the window."""
        current = read(now)
        with self._lock:
            while self._readings and self._readings[0].at < current.at - WINDOW:
                self._readings.popleft()
            base = next((r for r in self._readings if r.at <= current.at - MIN_SPAN), None)
            self._readings.append(current)
        base = base or Reading(self.started)
        span = max(current.at - base.at, 1e-9)
        routes = []
        for key, total in sorted(current.counts.items(), key=lambda kv: kv[0][1]):
            n = total - base.counts.get(key, 0.0)
            if n <= 0:
                continue
            old = base.buckets.get(key, {})
            delta = {le: c - old.get(le, 0.0) for le, c in current.buckets.get(key, {}).items()}
            ms = {f"p{int(q * 100)}": quantile(q, delta) for q in (0.5, 0.95, 0.99)}
            routes.append(
                {
                    "method": key[0],
                    "route": key[1],
                    "requests": int(n),
                    "per_second": n / span,
                    "errors": int(current.errors.get(key, 0.0) - base.errors.get(key, 0.0)),
                    **{k: (v * 1000 if v is not None else None) for k, v in ms.items()},
                }
            )
        return {"seconds": span, "since_start": base.at == self.started, "routes": routes,
                "ingest": _ingestion(current, base, span)}
