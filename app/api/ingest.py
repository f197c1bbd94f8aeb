"""Group commit for ``POST /v1/events``: one transaction for whatever arrived while the last one ran.

A transaction per request made the database's fixed cost per commit (a WAL flush, a lock, a round trip)
the cost of every event. Here each worker has one committer thread: a request hands its validated rows
over (a deque append under a lock, on the event loop) and awaits a future; the thread takes everything
queued, writes it in one transaction and resolves each request's future only after that commit has
returned. An acknowledged event is exactly as durable as before (SQLite WAL with ``synchronous=FULL``,
PostgreSQL synchronous commit); a request waits for the commit in progress and its own (on SQLite also
for other workers' commits, which take turns on the write lock: a committer takes the lock first and
its group second, so what arrives meanwhile joins the group).

Per request, all or nothing, and the counts stay exact: within a group the first request to carry an
``event_id`` owns it, and the insert names the ids it stored. When a group's transaction fails for a
reason validation cannot see (a constraint or trigger refusing one request's rows), each request is
retried alone, so only the guilty one fails. When the database is away, everyone in the group gets a 503.
The queue is bounded in events: past the bound, requests are refused at once instead of piling up.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import threading
import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Connection, Engine

from app.api import metrics
from app.db.engine import unavailable
from app.db.events import IdCache, insert_new_events

log = logging.getLogger("recsys.ingest")

WARM_IDS = 100_000  # newest users and items (each) loaded into the id cache when the committer starts
RETRY_AFTER = 1  # seconds, in the Retry-After of every 503
TRANSIENT_TRIES = 3  # a deadlock or serialization failure (SQLSTATE class 40) is tried again this often


class Refused(Exception):
    """A request the committer could not (or may not have) stored; ``status`` 503 means "retry later"."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status, self.code, self.message = status, code, message
        self.retry_after = RETRY_AFTER if status == 503 else None


def _queue_full() -> Refused:
    return Refused(503, "events_queue_full", "too many events are waiting for a commit; retry shortly")


def _unavailable() -> Refused:
    return Refused(503, "database_unavailable", "the database is unavailable; retry with the same event_ids")


def _timeout(seconds: float) -> Refused:
    return Refused(
        503,
        "commit_timeout",
        f"no commit within {seconds:g}s; the events may or may not be stored: retrying with the same "
        "event_ids is safe",
    )


def _shutting_down() -> Refused:
    return Refused(503, "shutting_down", "the service is stopping; retry on another instance")


@dataclass(eq=False, slots=True)
class _Pending:
    """One request's rows (unique event_ids), its future and the loop that awaits it."""

    rows: list[dict[str, Any]]
    future: asyncio.Future[int]
    loop: asyncio.AbstractEventLoop
    accepted: int = 0
    error: Refused | None = None


def _is_transient(exc: BaseException) -> bool:
    return str(getattr(getattr(exc, "orig", None), "sqlstate", None) or "").startswith("40")


class GroupCommitter:
    """The per-worker queue of event writes and the thread that commits them in groups."""

    def __init__(
        self,
        engine: Engine,
        write_lock: AbstractContextManager[Any],
        *,
        max_queue: int,
        max_group: int,
        max_wait: float,
        on_commit: Callable[[list[tuple[int, str, str, str]]], None] | None = None,
    ) -> None:
        """``on_commit`` gets each group's new events as (events.id, user, item, type) after the commit,
        outside the write lock, and before any request of the group is answered (the worker's view of
        recent events)."""
        self._engine = engine
        self._on_commit = on_commit
        self._write_lock = write_lock
        self.max_queue, self.max_group, self.max_wait = max_queue, max_group, max_wait
        self._queue: collections.deque[_Pending] = collections.deque()
        self._queued = 0  # events in the queue
        self._cond = threading.Condition()
        self._closed = False
        self._outage = False
        self._ids = IdCache()  # internal user and item ids, kept across commits
        self._committed: list[tuple[int, str, str, str]] = []  # for on_commit, after the write lock
        self._conn: Connection | None = None
        self._autocommit: Connection | None = None
        self._thread: threading.Thread | None = None

    # --- the request side (event loop) ---------------------------------------------------------------
    async def write(self, rows: list[dict[str, Any]]) -> int:
        """Store ``rows`` (unique event_ids) in the next group commit; the number that were new.

        Returns only after the commit holding them has returned; raises Refused otherwise.
        """
        loop = asyncio.get_running_loop()
        pending = _Pending(rows, loop.create_future(), loop)
        self._submit(pending)
        try:
            async with asyncio.timeout(self.max_wait):
                return await pending.future
        except TimeoutError:
            metrics.EVENTS_REFUSED.labels("commit_timeout").inc()
            raise _timeout(self.max_wait) from None

    def _submit(self, pending: _Pending) -> None:
        n = len(pending.rows)
        with self._cond:
            if self._closed:
                refused = _shutting_down()
            elif self._queued and self._queued + n > self.max_queue:
                refused = _queue_full()
            else:
                self._queue.append(pending)
                self._queued += n
                metrics.EVENTS_QUEUE_DEPTH.set(self._queued)
                self._cond.notify()
                return
        metrics.EVENTS_REFUSED.labels(refused.code).inc()
        raise refused

    # --- lifecycle --------------------------------------------------------------------------------------
    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="event-group-commit", daemon=True)
        self._thread.start()

    def close(self, timeout: float = 30.0) -> None:
        """Refuse new writes, commit what is queued, stop the thread."""
        with self._cond:
            self._closed = True
            self._cond.notify()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None
        self._drop_connection()

    # --- the committer thread ----------------------------------------------------------------------------
    def _run(self) -> None:
        self._warm()
        while self._wait_for_work():
            group: list[_Pending] = []
            try:
                # The write lock first, then the queue: what arrives while another worker's commit holds
                # the SQLite lock joins this group instead of waiting for the next one.
                with self._write_lock:
                    group = self._take()
                    self._commit(group)
            except Exception as exc:  # the lock file, or a bug: answer, and keep the thread alive
                log.exception("event group commit failed")
                group = group or self._take()
                refusal = _unavailable() if unavailable(exc) else Refused(500, "internal_error", "internal error")
                for pending in group:
                    pending.error = pending.error or refusal
            self._publish()
            self._resolve(group)

    def _warm(self) -> None:
        """Preload the id cache, so that the first events of known users are single statements too.
        Requests that arrive meanwhile wait in the queue; without the database, the cache fills as usual."""
        start = time.perf_counter()
        try:
            with self._engine.connect() as conn:
                held = self._ids.warm(conn, WARM_IDS)
        except Exception as exc:
            self._ids = IdCache()
            log.warning("could not preload user and item ids; they are looked up as events arrive: %s", exc)
            return
        log.info("preloaded %d user and item ids in %.2fs", held, time.perf_counter() - start)

    def _wait_for_work(self) -> bool:
        """Block until something is queued; False once closed with nothing left to commit."""
        with self._cond:
            while not self._queue:
                if self._closed:
                    return False
                self._cond.wait()
        return True

    def _take(self) -> list[_Pending]:
        """Everything queued, up to ``max_group`` events (a request is never split, the first always fits)."""
        with self._cond:
            group: list[_Pending] = []
            size = 0
            while self._queue and (not group or size + len(self._queue[0].rows) <= self.max_group):
                pending = self._queue.popleft()
                self._queued -= len(pending.rows)
                if not pending.future.done():  # done: its request timed out and was answered 503
                    group.append(pending)
                    size += len(pending.rows)
            metrics.EVENTS_QUEUE_DEPTH.set(self._queued)
        return group

    def _commit(self, group: list[_Pending]) -> None:
        """One transaction for the group; split per request when the group fails for one request's rows."""
        if not group:
            return
        for attempt in range(TRANSIENT_TRIES):
            try:
                self._write(group)
            except Exception as exc:
                if _is_transient(exc) and attempt + 1 < TRANSIENT_TRIES:
                    continue
                self._failed(group, exc)
            else:
                if self._outage:
                    self._outage = False
                    log.warning("database available again; events are committed")
            return

    def _failed(self, group: list[_Pending], exc: Exception) -> None:
        if unavailable(exc):
            if not self._outage:
                self._outage = True
                log.warning("database unavailable; event writes answer 503 until it returns: %s", exc)
            for pending in group:
                pending.error = _unavailable()
            metrics.EVENTS_REFUSED.labels("database_unavailable").inc(len(group))
        elif len(group) > 1:
            for pending in group:
                self._commit([pending])
        else:
            reason = str(getattr(exc, "orig", exc)).splitlines()[0][:300]
            log.warning("the database refused a request's events: %s", reason)
            group[0].error = Refused(422, "rejected_by_database", f"the database refused these events: {reason}")
            metrics.EVENTS_REFUSED.labels("rejected_by_database").inc()

    def _write(self, group: list[_Pending]) -> None:
        owner: dict[str, _Pending] = {}
        rows: list[dict[str, Any]] = []
        for pending in group:
            pending.accepted = 0
            for row in pending.rows:
                if owner.setdefault(row["event_id"], pending) is pending:
                    rows.append(row)  # an id repeated by a later request of the group is its duplicate
        start = time.perf_counter()
        try:
            if self._ids.one_statement(rows):  # committed by the database as it runs: no BEGIN, no COMMIT
                new = insert_new_events(self._connection(autocommit=True), rows, self._ids)
            else:
                conn = self._connection()
                with conn.begin():
                    new = insert_new_events(conn, rows, self._ids)
        except BaseException:
            self._ids = IdCache()  # ids created in the rolled-back transaction do not exist
            self._drop_connection()
            raise
        metrics.EVENTS_COMMIT_SECONDS.observe(time.perf_counter() - start)
        metrics.EVENTS_PER_COMMIT.observe(len(rows))
        for event_id in new:
            owner[event_id].accepted += 1
        if self._on_commit is not None and new:
            self._committed.extend((new[r["event_id"]], r["user_id"], r["item_id"], r["type"])
                                   for r in rows if r["event_id"] in new)

    def _publish(self) -> None:
        """Hand the group's new events to ``on_commit`` once the write lock is released (the other
        worker's committer may take it meanwhile), before any request of the group is answered."""
        committed, self._committed = self._committed, []
        if self._on_commit is None or not committed:
            return
        try:
            self._on_commit(committed)
        except Exception:  # stored and committed: the view catches up through its tail
            log.exception("could not add committed events to the recent-events view")

    def _connection(self, autocommit: bool = False) -> Connection:
        """The committer's own connections, kept between groups: a pool checkout pings the server first,
        one more round trip per commit. The autocommit one writes a group that is a single statement
        (the usual case: known users and items, a few events), so that PostgreSQL commits it in the
        statement's own round trip instead of three (BEGIN, INSERT, COMMIT)."""
        if autocommit:
            if self._autocommit is None:
                self._autocommit = self._engine.connect().execution_options(isolation_level="AUTOCOMMIT")
            return self._autocommit
        if self._conn is None:
            self._conn = self._engine.connect()
        return self._conn

    def _drop_connection(self) -> None:
        """After a failure: the next group starts on fresh connections (a broken one is discarded)."""
        for conn in (self._conn, self._autocommit):
            if conn is not None:
                with contextlib.suppress(Exception):
                    conn.close()
        self._conn = self._autocommit = None

    @staticmethod
    def _resolve(group: list[_Pending]) -> None:
        """Answer the group's requests: one wake-up of each event loop, not one per request."""
        by_loop: dict[asyncio.AbstractEventLoop, list[_Pending]] = {}
        for pending in group:
            by_loop.setdefault(pending.loop, []).append(pending)
        for loop, part in by_loop.items():
            with contextlib.suppress(RuntimeError):  # a closed loop: nobody is waiting any more
                loop.call_soon_threadsafe(_settle, part)


def _settle(group: list[_Pending]) -> None:
    for pending in group:
        if pending.future.done():
            continue  # answered 503 after its wait ran out
        if pending.error is not None:
            pending.future.set_exception(pending.error)
        else:
            pending.future.set_result(pending.accepted)
