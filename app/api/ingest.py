"""Group commit for ``POST /v1/events``: one transaction for whatever arrived while the last one ran.

A transaction per request made the database's fixed cost per commit (a WAL flush, a lock, a round trip)
the cost of every event. Here each worker has one committer: a request hands its validated rows over (a
deque append under a lock, on the event loop) and awaits a future; the committer takes everything
queued, writes it in one transaction and resolves each request's future only after that commit has
returned. On SQLite the committer is a thread (the driver and the cross-process write lock block). On
PostgreSQL it is a coroutine on the worker's event loop: a group of up to ``VALUES_MAX`` events is one
statement on psycopg's AsyncConnection when the worker knows its users and items (the usual case), with
two more per table when some are new (they are created first), and anything else (a large batch, a
failure) goes through the same thread-side code as SQLite's, in a thread it awaits. A thread
there paid for every wait on the server twice: it gave up the interpreter and then queued for it behind
the busy event loop (docs/benchmarks.md, "Event ingestion"). An acknowledged event is exactly as
durable as before (SQLite WAL with ``synchronous=FULL``, PostgreSQL synchronous commit); a request
waits for the commit in progress and its own (on SQLite also for other workers' commits, which take
turns on the write lock: a committer makes what is queued ready for the database first, so that the
lock is held for the database's own work, and takes what arrived while it waited for the lock into the
same group).

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
from operator import itemgetter
from typing import TYPE_CHECKING, Any

from sqlalchemy import Connection, Engine

from app.api import metrics
from app.db.engine import unavailable
from app.db.events import (
    VALUES_MAX,
    IdCache,
    Record,
    cached_records,
    insert_known_events_async,
    insert_new_events,
    resolve_ids_async,
)

if TYPE_CHECKING:
    import psycopg

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


class _Batch:
    """A group's rows, each event_id once (the first request of the group to carry it owns it), and
    their records when every user and item id is cached (``cached_records``): made before the write
    lock is taken, so that the lock is held for the database's own work."""

    def __init__(self, ids: IdCache) -> None:
        self.ids = ids
        self.owner: dict[str, _Pending] = {}
        self.rows: list[dict[str, Any]] = []
        self.records: list[Record] | None = []

    def add(self, group: list[_Pending]) -> _Batch:
        """This batch with ``group``'s rows after its own (user order kept: a stable merge of the runs)."""
        fresh: list[dict[str, Any]] = []
        for pending in group:
            pending.accepted = 0
            for row in pending.rows:
                if self.owner.setdefault(row["event_id"], pending) is pending:
                    fresh.append(row)  # an id repeated by a later request of the group is its duplicate
        if not fresh:
            return self
        self.rows += fresh
        records = cached_records(fresh, self.ids) if self.records is not None else None
        self.records = None if records is None else sorted(self.records + records, key=itemgetter(1))
        return self


def _is_transient(exc: BaseException) -> bool:
    return str(getattr(getattr(exc, "orig", None), "sqlstate", None) or "").startswith("40")


class GroupCommitter:
    """The per-worker queue of event writes and the committer (a thread, or a coroutine on PostgreSQL)
    that commits them in groups."""

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
        self._committed: list[tuple[list[dict[str, Any]], dict[str, int]]] = []  # (rows, new) for on_commit
        self._conn: Connection | None = None
        self._autocommit: Connection | None = None
        self._thread: threading.Thread | None = None
        self._task: asyncio.Task[None] | None = None  # PostgreSQL: the committer coroutine
        self._loop: asyncio.AbstractEventLoop | None = None  # and the loop it runs on
        self._work = asyncio.Event()  # set when something is queued (the coroutine's wake-up)
        self._async_conn: psycopg.AsyncConnection | None = None  # its autocommit connection, kept between groups

    # --- the request side (event loop) ---------------------------------------------------------------
    async def write(self, rows: list[dict[str, Any]]) -> int:
        """Store ``rows`` (unique event_ids) in the next group commit; the number that were new.

        Returns only after the commit holding them has returned; raises Refused otherwise.
        """
        loop = asyncio.get_running_loop()
        pending = _Pending(rows, loop.create_future(), loop)
        self._submit(pending)
        if self._loop is loop:
            self._work.set()
        elif self._loop is not None:
            self._loop.call_soon_threadsafe(self._work.set)
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
        """Start the committer: on PostgreSQL a coroutine on the running event loop, else a thread."""
        if self._engine.dialect.name == "postgresql":
            self._loop = asyncio.get_running_loop()
            self._task = self._loop.create_task(self._run_async(), name="event-group-commit")
            return
        self._thread = threading.Thread(target=self._run, name="event-group-commit", daemon=True)
        self._thread.start()

    async def aclose(self, timeout: float = 30.0) -> None:
        """Refuse new writes, commit what is queued, stop the committer."""
        if self._task is None:
            await asyncio.to_thread(self.close, timeout)
            return
        with self._cond:
            self._closed = True
        self._work.set()
        try:
            await asyncio.wait_for(self._task, timeout)
        except TimeoutError:
            log.warning("event committer still busy after %gs; stopped", timeout)
        self._task = None
        await asyncio.to_thread(self._drop_connection)

    def close(self, timeout: float = 30.0) -> None:
        """``aclose`` for the committer thread."""
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
            held = 0  # events taken before the write lock: they count as queued until it is ours
            try:
                # What is queued is made ready for the database before the write lock is taken (another
                # worker's commit may hold it: SQLite has one writer); what arrives while waiting for it
                # joins the group.
                group = self._take(self.max_group, counted=True)
                held = sum(len(pending.rows) for pending in group)
                batch = _Batch(self._ids).add(group)
                with self._write_lock:
                    self._uncount(held)
                    held = 0
                    group, batch = self._live(group, batch)
                    more = self._take(self.max_group - len(batch.rows))
                    group += more
                    self._commit(group, batch.add(more))
            except Exception as exc:  # the lock file, or a bug: answer, and keep the thread alive
                self._uncount(held)
                self._refuse(group or self._take(self.max_group), exc)
            self._publish()
            self._resolve(group)

    async def _run_async(self) -> None:
        """PostgreSQL's committer, on the worker's event loop: a group of up to ``VALUES_MAX`` events is
        written on an AsyncConnection; any other group goes through ``_commit`` in a thread, awaited."""
        await asyncio.to_thread(self._warm)
        while True:
            group = self._take(self.max_group)
            if not group:  # the queue is empty
                if self._closed:
                    break
                await self._work.wait()
                self._work.clear()
                continue
            try:
                batch = _Batch(self._ids).add(group)
                if not await self._write_async(batch):
                    await asyncio.to_thread(self._commit, group, batch)
            except Exception as exc:  # a bug: answer, and keep the committer alive
                self._refuse(group, exc)
            self._publish()
            self._resolve(group)
        await self._drop_async_connection()

    async def _write_async(self, batch: _Batch) -> bool:
        """Write a group as one autocommitted statement, after creating the users and items the id cache
        lacks (a new visitor's first event; in a thread, the general path cost a round trip per statement
        plus BEGIN and COMMIT, and a wait for the interpreter at each). False when the group needs
        ``_commit`` (a large batch) or when this failed: ``_commit`` then writes it again (idempotent by
        event_id) and tells a database that is away (503) from refused rows (422)."""
        if not batch.rows or len(batch.rows) > VALUES_MAX:
            return False
        start = time.perf_counter()
        try:
            if self._async_conn is None:
                import psycopg  # the PostgreSQL driver; a SQLite deployment never loads it

                dsn = self._engine.url.set(drivername="postgresql").render_as_string(hide_password=False)
                self._async_conn = await psycopg.AsyncConnection.connect(dsn, autocommit=True, connect_timeout=10)
            if batch.records is None:  # a new user or item (a visitor's first event): create it first
                await resolve_ids_async(self._async_conn, self._ids, {r["user_id"] for r in batch.rows},
                                        {r["item_id"] for r in batch.rows})
                batch.records = cached_records(batch.rows, self._ids)
                if batch.records is None:  # an id did not come back: the general path finds out why
                    return False
            new = await insert_known_events_async(self._async_conn, batch.records)
        except Exception as exc:
            log.debug("short path failed, the group goes through the general one: %s", exc)
            if self._async_conn is not None and self._async_conn.broken:
                await self._drop_async_connection()
            return False
        self._written(batch, new, start)
        return True

    async def _drop_async_connection(self) -> None:
        conn, self._async_conn = self._async_conn, None
        if conn is not None:
            with contextlib.suppress(Exception):
                await conn.close()

    @staticmethod
    def _refuse(group: list[_Pending], exc: Exception) -> None:
        """A failure outside the database's answer (the lock file, a bug): 503 or 500 for the group."""
        log.exception("event group commit failed", exc_info=exc)
        refusal = _unavailable() if unavailable(exc) else Refused(500, "internal_error", "internal error")
        for pending in group:
            pending.error = pending.error or refusal

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

    def _take(self, room: int, counted: bool = False) -> list[_Pending]:
        """Queued requests, up to ``room`` events; a request is never split, and one of any size is
        taken when ``room`` is the whole of ``max_group``. ``counted``: their events still count as
        queued (the bound, the gauge) until ``_uncount``."""
        with self._cond:
            group: list[_Pending] = []
            whole = room >= self.max_group
            while self._queue and ((whole and not group) or len(self._queue[0].rows) <= room):
                pending = self._queue.popleft()
                if not counted or pending.future.done():
                    self._queued -= len(pending.rows)
                if not pending.future.done():  # done: its request timed out and was answered 503
                    group.append(pending)
                    room -= len(pending.rows)
            metrics.EVENTS_QUEUE_DEPTH.set(self._queued)
        return group

    def _uncount(self, events: int) -> None:
        """Events taken ``counted`` leave the queue's count."""
        if events:
            with self._cond:
                self._queued -= events
                metrics.EVENTS_QUEUE_DEPTH.set(self._queued)

    def _live(self, group: list[_Pending], batch: _Batch) -> tuple[list[_Pending], _Batch]:
        """The group without the requests that timed out while the write lock was held elsewhere (they
        were answered 503 and are not written)."""
        live = [pending for pending in group if not pending.future.done()]
        if len(live) == len(group):
            return group, batch
        return live, _Batch(self._ids).add(live)

    def _commit(self, group: list[_Pending], batch: _Batch | None = None) -> None:
        """One transaction for the group; split per request when the group fails for one request's rows."""
        if not group:
            return
        batch = batch or _Batch(self._ids).add(group)
        for attempt in range(TRANSIENT_TRIES):
            try:
                self._write(batch)
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

    def _write(self, batch: _Batch) -> None:
        rows = batch.rows
        start = time.perf_counter()
        try:
            if batch.records is not None and len(rows) <= VALUES_MAX:
                # one statement, committed by the database as it runs: no BEGIN, no COMMIT
                new = insert_new_events(self._connection(autocommit=True), rows, self._ids, batch.records)
            else:
                conn = self._connection()
                with conn.begin():
                    new = insert_new_events(conn, rows, self._ids, batch.records)
        except BaseException:
            self._ids = IdCache()  # ids created in the rolled-back transaction do not exist
            self._drop_connection()
            raise
        self._written(batch, new, start)

    def _written(self, batch: _Batch, new: dict[str, int], start: float) -> None:
        """A group's commit returned: metrics, each request's count, the new events for ``on_commit``."""
        rows = batch.rows
        metrics.EVENTS_COMMIT_SECONDS.observe(time.perf_counter() - start)
        metrics.EVENTS_PER_COMMIT.observe(len(rows))
        for event_id in new:
            batch.owner[event_id].accepted += 1
        if self._on_commit is not None and new:
            self._committed.append((rows, new))

    def _publish(self) -> None:
        """Hand the group's new events to ``on_commit`` once the write lock is released (the other
        worker's committer may take it meanwhile), before any request of the group is answered."""
        committed, self._committed = self._committed, []
        if self._on_commit is None or not committed:
            return
        try:
            self._on_commit([(new[r["event_id"]], r["user_id"], r["item_id"], r["type"])
                             for rows, new in committed for r in rows if r["event_id"] in new])
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

    def _resolve(self, group: list[_Pending]) -> None:
        """Answer the group's requests: at once on the committer's own loop, else one wake-up of each
        event loop, not one per request."""
        by_loop: dict[asyncio.AbstractEventLoop, list[_Pending]] = {}
        for pending in group:
            by_loop.setdefault(pending.loop, []).append(pending)
        for loop, part in by_loop.items():
            if loop is self._loop:
                _settle(part)
                continue
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
