"""Impression logging: what was served to whom, written in batches off the request path.

Served-but-not-clicked items are the most realistic negatives the trainer gets, but a
recommendation must not wait for a database write. Requests enqueue their served list;
one background thread writes batches and drains the queue on a clean shutdown.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Sequence
from dataclasses import dataclass

from sqlalchemy import Connection, Engine

from app.db.events import upsert_items, upsert_users
from app.db.models import Impression

log = logging.getLogger("recsys.impressions")


@dataclass(frozen=True)
class Served:
    """One served list: items in rank order (rank 1 first)."""

    request_id: str
    user_id: str
    item_ids: Sequence[str]
    model_version: str | None


class IdCache:
    """External → internal ids of users and items, so a batch of impressions is one plain INSERT.

    Ids never change once assigned, so entries never go stale; the cache is cleared when it grows past
    ``limit`` entries to bound memory.
    """

    def __init__(self, limit: int = 2_000_000) -> None:
        self.users: dict[str, int] = {}
        self.items: dict[str, int] = {}
        self.limit = limit

    def resolve(self, conn: Connection, users: set[str], items: set[str]) -> None:
        if len(self.users) + len(self.items) > self.limit:
            self.users.clear()
            self.items.clear()
        missing_users = [u for u in users if u not in self.users]
        missing_items = [i for i in items if i not in self.items]
        if missing_users:
            self.users.update(upsert_users(conn, missing_users))
        if missing_items:
            self.items.update(upsert_items(conn, missing_items))


def write_impressions(conn: Connection, batch: Sequence[Served], ids: IdCache | None = None) -> int:
    """Insert the impressions of ``batch`` in the caller's transaction; unknown users/items are created."""
    batch = [s for s in batch if s.item_ids]
    if not batch:
        return 0
    ids = ids or IdCache()
    ids.resolve(conn, {s.user_id for s in batch}, {i for s in batch for i in s.item_ids})
    users, items = ids.users, ids.items
    rows = [
        {
            "request_id": s.request_id,
            "user_id": users[s.user_id],
            "item_id": items[item],
            "model_version": s.model_version,
            "rank": rank,
        }
        for s in batch
        for rank, item in enumerate(s.item_ids, start=1)
    ]
    conn.execute(Impression.__table__.insert(), rows)
    return len(rows)


class ImpressionWriter:
    """A bounded queue and one writer thread; when the database falls behind, lists are dropped and counted.

    Dropping beats unbounded memory or slowing down recommendations: impressions are training signal,
    not a ledger. ``dropped`` and ``written`` are exposed for metrics.
    """

    def __init__(self, engine: Engine, *, max_queue: int = 10_000, batch: int = 500, interval: float = 0.5):
        self._engine = engine
        self._queue: queue.Queue[Served | None] = queue.Queue(maxsize=max_queue)
        self._batch = batch
        self._interval = interval
        self._thread: threading.Thread | None = None
        self.dropped = 0
        self.written = 0
        self.failed = 0
        self._ids = IdCache()

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="impression-writer", daemon=True)
        self._thread.start()

    def submit(self, served: Served) -> bool:
        try:
            self._queue.put_nowait(served)
            return True
        except queue.Full:
            self.dropped += 1
            return False

    def close(self, timeout: float = 30.0) -> None:
        """Write everything queued so far, then stop the thread."""
        if self._thread is None:
            return
        self._queue.put(None)
        self._thread.join(timeout)
        self._thread = None

    def _run(self) -> None:
        stop = False
        while not stop:
            pending: list[Served] = []
            try:
                first = self._queue.get(timeout=self._interval)
            except queue.Empty:
                continue
            if first is None:
                stop = True
            else:
                pending.append(first)
            while len(pending) < self._batch:
                try:
                    more = self._queue.get_nowait()
                except queue.Empty:
                    break
                if more is None:
                    stop = True
                    break
                pending.append(more)
            if stop:  # drain the rest before stopping
                while True:
                    try:
                        more = self._queue.get_nowait()
                    except queue.Empty:
                        break
                    if more is not None:
                        pending.append(more)
            self._flush(pending)

    def _flush(self, pending: list[Served]) -> None:
        if not pending:
            return
        try:
            with self._engine.begin() as conn:
                self.written += write_impressions(conn, pending, self._ids)
        except Exception:  # a failed batch is logged and counted; serving goes on
            self._ids = IdCache()  # ids created in the rolled-back transaction do not exist
            self.failed += len(pending)
            log.exception("could not write %d impression lists", len(pending))
