"""Impression logging: what was served to whom, written in batches off the request path.

Served-but-not-clicked items are the most realistic negatives the trainer gets, but a
recommendation must not wait for a database write. Requests enqueue their served list;
one background thread writes batches and drains the queue on a clean shutdown. Each list is
one row (item ids in rank order), which keeps the writer's share of server CPU small.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import threading
from collections.abc import Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Connection, Engine

from app.db.events import IdCache

log = logging.getLogger("recsys.impressions")


@dataclass(frozen=True)
class Served:
    """One served list: items in rank order (rank 1 first)."""

    request_id: str
    user_id: str
    item_ids: Sequence[str]
    model_version: str | None


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
    """A bounded buffer and one writer thread; when the database falls behind, lists are dropped and counted.

    Dropping beats unbounded memory or slowing down recommendations: impressions are training signal,
    not a ledger. ``dropped`` and ``written`` (lists) are exposed for metrics.

    ``submit`` is one ``deque.append`` (atomic under the GIL, no lock, no wake-up); the thread wakes every
    ``interval`` seconds and writes what has gathered in transactions of up to ``batch`` lists. A queue
    whose ``get`` woke the thread for every list cost the request path a thread switch per recommendation
    (bench/serve.py, py-spy).
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
        self._pending: collections.deque[Served] = collections.deque()
        self._max_queue = max_queue
        self._batch = batch
        self._interval = interval
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.dropped = 0
        self.written = 0
        self.failed = 0
        self._ids = IdCache()

    def start(self) -> None:
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="impression-writer", daemon=True)
        self._thread.start()

    def submit(self, served: Served) -> bool:
        if len(self._pending) >= self._max_queue:
            self.dropped += 1
            return False
        self._pending.append(served)
        return True

    def close(self, timeout: float = 30.0) -> None:
        """Write everything submitted so far, then stop the thread."""
        if self._thread is None:
            return
        self._stop.set()
        self._thread.join(timeout)
        self._thread = None

    def _run(self) -> None:
        """Every ``interval`` seconds (and once more on close) write what has gathered.

        Gathering matters: writing each list as it arrives would be one transaction (and one fsync) per
        recommendation. Small transactions matter too: the writer holds the GIL while it builds a batch.
        """
        while True:
            stopping = self._stop.wait(self._interval)
            while self._pending:
                batch: list[Served] = []
                while self._pending and len(batch) < self._batch:
                    batch.append(self._pending.popleft())
                self._flush(batch)
            if stopping:
                return

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
