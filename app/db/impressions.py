"""Impression logging: what was served to whom, written in batches off the request path.

Served-but-not-clicked items are the most realistic negatives the trainer gets, but a
recommendation must not wait for a database write. Requests enqueue their served list;
one background thread writes batches and drains the queue on a clean shutdown. Each list is
one row (item ids in rank order), which keeps the writer's share of server CPU small.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import threading
import time
from collections.abc import Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Connection, Engine, select

from app.db.events import upsert_items, upsert_users
from app.db.models import Item, User

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
    ``limit`` entries to bound memory. Misses are looked up with one SELECT; only ids still missing are
    upserted (a cold user seen for the first time).
    """

    def __init__(self, limit: int = 2_000_000) -> None:
        self.users: dict[str, int] = {}
        self.items: dict[str, int] = {}
        self.limit = limit

    @staticmethod
    def _fill(
        conn: Connection, model: type[User] | type[Item], cache: dict[str, int], wanted: set[str]
    ) -> None:
        missing = [w for w in wanted if w not in cache]
        if not missing:
            return
        col = model.__table__.c.external_id
        for start in range(0, len(missing), 5000):
            part = missing[start : start + 5000]
            cache.update(conn.execute(select(col, model.__table__.c.id).where(col.in_(part))).all())
        still = [w for w in missing if w not in cache]
        if still:
            cache.update((upsert_users if model is User else upsert_items)(conn, still))

    def resolve(self, conn: Connection, users: set[str], items: set[str]) -> None:
        if len(self.users) + len(self.items) > self.limit:
            self.users.clear()
            self.items.clear()
        self._fill(conn, User, self.users, users)
        self._fill(conn, Item, self.items, items)


def encode_item_ids(ids: Sequence[int]) -> str:
    """Internal item ids in rank order as the compact JSON array stored in ``impressions.item_ids``.

    JSON rather than a bare list so both backends can expand it in SQL (``json_each`` on SQLite,
    ``json_array_elements_text`` on PostgreSQL).
    """
    return "[" + ",".join(map(str, ids)) + "]"


def decode_item_ids(text: str) -> list[int]:
    """The inverse of ``encode_item_ids``: internal item ids, rank 1 first."""
    inner = text.strip()[1:-1].strip()
    return [int(x) for x in inner.split(",")] if inner else []


def write_impressions(conn: Connection, batch: Sequence[Served], ids: IdCache | None = None) -> int:
    """Insert one row per served list of ``batch`` in the caller's transaction; returns the rows written.

    Unknown users/items are created. The rows go straight to the driver's executemany: SQLAlchemy's
    per-row work would cost more than the recommendations being logged.
    """
    batch = [s for s in batch if s.item_ids]
    if not batch:
        return 0
    ids = ids or IdCache()
    ids.resolve(conn, {s.user_id for s in batch}, {i for s in batch for i in s.item_ids})
    users, items = ids.users, ids.items
    rows = [
        (s.request_id, users[s.user_id], s.model_version, encode_item_ids([items[i] for i in s.item_ids]))
        for s in batch
    ]
    mark = "?" if conn.dialect.paramstyle == "qmark" else "%s"
    sql = (
        "INSERT INTO impressions (request_id, user_id, model_version, item_ids) "
        f"VALUES ({', '.join([mark] * 4)})"
    )
    conn.exec_driver_sql(sql, rows)
    return len(rows)


class ImpressionWriter:
    """A bounded queue and one writer thread; when the database falls behind, lists are dropped and counted.

    Dropping beats unbounded memory or slowing down recommendations: impressions are training signal,
    not a ledger. ``dropped`` and ``written`` (lists) are exposed for metrics.
    """

    def __init__(
        self,
        engine: Engine,
        *,
        max_queue: int = 10_000,
        batch: int = 500,
        interval: float = 0.5,
        write_lock: AbstractContextManager[Any] | None = None,
    ):
        self._engine = engine
        self._write_lock = write_lock or contextlib.nullcontext()
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
        """Block for the first list, then gather for up to ``interval`` seconds (or a full batch) and write.

        Gathering matters: writing each list as it arrives would be one transaction (and one fsync) per
        recommendation.
        """
        stop = False
        while not stop:
            first = self._queue.get()
            if first is None:
                stop = True
                pending: list[Served] = []
            else:
                pending = [first]
                deadline = time.monotonic() + self._interval
                while len(pending) < self._batch:
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        break
                    try:
                        more = self._queue.get(timeout=remaining)
                    except queue.Empty:
                        break
                    if more is None:
                        stop = True
                        break
                    pending.append(more)
            if stop:  # drain whatever is left before stopping
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
            with self._write_lock, self._engine.begin() as conn:
                self.written += write_impressions(conn, pending, self._ids)
        except Exception:  # a failed batch is logged and counted; serving goes on
            self._ids = IdCache()  # ids created in the rolled-back transaction do not exist
            self.failed += len(pending)
            log.exception("could not write %d impression lists", len(pending))
