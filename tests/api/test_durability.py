"""Acknowledged means committed: every event answered 200 survives a kill -9 of the server, and a
database that goes away mid-load costs 503s, never an acknowledged event or a hang.

The writers are concurrent, so the service's group committer puts several requests in each commit
(checked on its metrics before the kill).
"""

from __future__ import annotations

import re
import signal
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import httpx
from api_support import Server, deploy
from pg_support import OwnPostgres
from sqlalchemy import select

from app.db.engine import make_engine
from app.db.models import Event, Impression


@dataclass
class Answer:
    start: float
    end: float
    status: int  # 0: no answer (connection refused or reset)
    code: str | None
    retry_after: str | None
    ids: list[str]


def _writer(base: str, prefix: str, batch: int, answers: list[Answer], stop: threading.Event) -> None:
    """Post new events (one per request, or batches) until told to stop or the server dies."""
    with httpx.Client(base_url=base, timeout=30.0) as c:
        n = 0
        while not stop.is_set():
            events = [
                {"event_id": f"{prefix}-{n + j}", "user_id": f"u{j % 30}", "item_id": f"i{(n + j) % 400}", "type": "view"}
                for j in range(batch)
            ]
            n += batch
            start = time.monotonic()
            try:
                r = c.post("/v1/events", json=events[0] if batch == 1 else events)
            except httpx.HTTPError:
                answers.append(Answer(start, time.monotonic(), 0, None, None, []))
                if stop.is_set():
                    return
                time.sleep(0.05)
                continue
            code = r.json()["error"]["code"] if r.status_code != 200 else None
            ids = [e["event_id"] for e in events]
            answers.append(Answer(start, time.monotonic(), r.status_code, code, r.headers.get("retry-after"), ids))


def _stored(url: str, prefix: str) -> set[str]:
    engine = make_engine(url)
    try:
        with engine.connect() as conn:
            return set(conn.execute(select(Event.event_id).where(Event.event_id.like(f"{prefix}%"))).scalars())
    finally:
        engine.dispose()


def _commits_and_posts(base: str) -> tuple[float, float]:
    """Group commits so far, and event POSTs answered 200 (single-worker server)."""
    text = httpx.get(base + "/metrics", timeout=10).text
    commits = re.search(r"^recsys_events_per_commit_count (\S+)$", text, re.M)
    posts = re.search(r'^recsys_http_requests_total\{[^}]*route="/v1/events"[^}]*status="200"[^}]*\} (\S+)$', text, re.M)
    return float(commits.group(1)) if commits else 0.0, float(posts.group(1)) if posts else 0.0


def _start_writers(base: str, prefix: str, answers: list[Answer], stop: threading.Event) -> list[threading.Thread]:
    """Six concurrent writers: three post single events, three batches of 20."""
    threads = [
        threading.Thread(target=_writer, args=(base, f"{prefix}{i}", 1 if i < 3 else 20, answers, stop))
        for i in range(6)
    ]
    for t in threads:
        t.start()
    return threads


def test_acknowledged_events_survive_kill_9(fresh_url: str, tmp_path: Path) -> None:
    dep = deploy(fresh_url, tmp_path)
    srv = Server(dep)
    srv.wait_ready()
    stop = threading.Event()
    answers: list[Answer] = []
    prefix = uuid.uuid4().hex[:8]
    threads = _start_writers(srv.base, prefix, answers, stop)
    time.sleep(1.5)
    commits, posts = _commits_and_posts(srv.base)
    srv.stop(signal.SIGKILL)
    stop.set()
    for t in threads:
        t.join()
    acked = {i for a in answers if a.status == 200 for i in a.ids}
    assert len(acked) >= 100, "the writers should have been acknowledged many times before the kill"
    assert 0 < commits < posts, f"{commits} commits for {posts} requests: the writes were not grouped"
    missing = acked - _stored(dep.url, prefix)
    assert not missing, f"{len(missing)} acknowledged events lost, e.g. {sorted(missing)[:5]}"


def test_postgres_stopped_mid_load_means_503s_then_recovery(own_postgres: OwnPostgres, tmp_path: Path) -> None:
    """Stop PostgreSQL under six writers and start it again: while it is down the service answers only 503
    (with Retry-After, within the configured wait), resumes by itself, and loses nothing it acknowledged."""
    dep = deploy(own_postgres.url, tmp_path)
    srv = Server(dep, extra_env={"RECSYS_EVENTS_MAX_WAIT_SECONDS": "2"})
    try:
        srv.wait_ready()
        stop = threading.Event()
        answers: list[Answer] = []
        prefix = uuid.uuid4().hex[:8]
        threads = _start_writers(srv.base, prefix, answers, stop)
        time.sleep(1.5)
        own_postgres.stop()
        down = time.monotonic()
        time.sleep(1.0)
        with srv.client() as c:  # a read that needs the database: 503 with the error shape, never a 500
            outage_read = c.get(f"/v1/users/cold-{prefix}/recommendations")
        time.sleep(1.5)
        restarting = time.monotonic()
        own_postgres.start()
        up = time.monotonic()
        deadline = up + 30
        while not any(a.status == 200 and a.start > up for a in answers) and time.monotonic() < deadline:
            time.sleep(0.1)
        time.sleep(1.0)
        with srv.client() as c:  # reads recover by themselves too
            after_read = c.get(f"/v1/users/cold-{prefix}/recommendations")
        stop.set()
        for t in threads:
            t.join(60)
        assert srv.proc.poll() is None, "the service died"
    finally:
        srv.stop()
    assert {a.status for a in answers} <= {200, 503}, sorted({a.status for a in answers})
    refused = [a for a in answers if a.status == 503]
    assert refused, "no request fell into the outage"
    assert {a.code for a in refused} <= {"database_unavailable", "commit_timeout"}, {a.code for a in refused}
    assert all(a.retry_after == "1" for a in refused)
    assert max(a.end - a.start for a in answers) < 2 + 3, "a request hung past the configured wait"
    assert not [a for a in answers if a.status == 200 and a.start > down and a.end < restarting], (
        "acknowledged while the database was down"
    )
    assert any(a.status == 200 and a.start > up for a in answers), "ingestion did not resume by itself"
    assert outage_read.status_code == 503, outage_read.text
    assert outage_read.json()["error"]["code"] == "database_unavailable"
    assert outage_read.headers["retry-after"] == "1"
    assert after_read.status_code == 200, after_read.text
    acked = {i for a in answers if a.status == 200 for i in a.ids}
    missing = acked - _stored(dep.url, prefix)
    assert not missing, f"{len(missing)} acknowledged events lost, e.g. {sorted(missing)[:5]}"


def test_impressions_queued_at_shutdown_are_written(tmp_path: Path) -> None:
    """A clean stop (SIGTERM) drains the impression queue before the process exits."""
    dep = deploy(f"sqlite:///{tmp_path / 'recsys.db'}", tmp_path)
    srv = Server(dep)
    srv.wait_ready()
    rids = []
    with srv.client() as c:
        for i in range(20):
            rids.append(c.get(f"/v1/users/u{i}/recommendations", params={"k": 3}).json()["request_id"])
    # uvicorn shuts down gracefully, then re-raises the signal: -15 is a clean exit here.
    assert srv.stop(signal.SIGTERM) in (0, -signal.SIGTERM)
    assert "could not write" not in srv.logs()
    engine = make_engine(dep.url)
    try:
        with engine.connect() as conn:
            logged = set(
                conn.execute(select(Impression.request_id).where(Impression.request_id.in_(rids))).scalars()
            )
    finally:
        engine.dispose()
    assert logged == set(rids)
