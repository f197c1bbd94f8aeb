"""Acknowledged means committed: every event answered 200 survives a kill -9 of the server."""

from __future__ import annotations

import signal
import threading
import time
import uuid
from pathlib import Path

import httpx
from api_support import Server, deploy
from sqlalchemy import select

from app.db.engine import make_engine
from app.db.models import Event, Impression


def _writer(base: str, prefix: str, acked: list[str], stop: threading.Event) -> None:
    with httpx.Client(base_url=base, timeout=10.0) as c:
        n = 0
        while not stop.is_set():
            batch = [
                {
                    "event_id": f"{prefix}-{n + j}",
                    "user_id": f"u{j % 30}",
                    "item_id": f"i{(n + j) % 400}",
                    "type": "view",
                }
                for j in range(20)
            ]
            n += 20
            try:
                r = c.post("/v1/events", json=batch)
            except httpx.HTTPError:
                return  # the server died mid-request: that batch was never acknowledged
            if r.status_code == 200:
                acked.extend(e["event_id"] for e in batch)


def test_acknowledged_events_survive_kill_9(fresh_url: str, tmp_path: Path) -> None:
    dep = deploy(fresh_url, tmp_path)
    srv = Server(dep)
    srv.wait_ready()
    stop = threading.Event()
    acked: list[str] = []
    prefix = uuid.uuid4().hex[:8]
    threads = [
        threading.Thread(target=_writer, args=(srv.base, f"{prefix}{i}", acked, stop)) for i in range(3)
    ]
    for t in threads:
        t.start()
    time.sleep(1.5)
    srv.stop(signal.SIGKILL)
    stop.set()
    for t in threads:
        t.join()
    assert len(acked) >= 100, "the writers should have been acknowledged many times before the kill"
    engine = make_engine(dep.url)
    try:
        with engine.connect() as conn:
            stored = set(
                conn.execute(select(Event.event_id).where(Event.event_id.like(f"{prefix}%"))).scalars()
            )
    finally:
        engine.dispose()
    missing = set(acked) - stored
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
