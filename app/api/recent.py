"""Each worker's in-memory view of events newer than the served model's watermark.

Excluding what a user saw since training would cost one database query per recommendation; instead a
background thread tails the events table every ``interval`` seconds and this worker's own POSTs are
added on commit (by the group committer, with their ids, which the tail then leaves out of its reads:
reading them back cost a worker ~13% of its CPU under batches of 1000 events). A PostgreSQL transaction
can commit after one with a higher id: the ids skipped over are remembered as gaps and looked up again
until they appear or ``GAP_SECONDS`` pass: on the next tick, then after as long again as each has been
missing. Most gaps are transactions still committing and appear on the next tick; the rest never do (a
rolled-back insert, or a duplicate event: PostgreSQL draws an id for every row ``ON CONFLICT DO NOTHING``
then skips), and looking up thousands of those on every tick took a worker's tail thread a fifth of a core
under load (docs/benchmarks.md, "Event ingestion"). An id that commits ``t`` seconds late is seen within
about ``2t``.
Re-reading a fixed window of recent ids instead cost each worker ~20k rows a second, and the event loop
its GIL, whether anything had been written or not. Staleness: an event written through another worker
or process is excluded within about ``interval`` seconds. When the view cannot answer (too many events
since the watermark, a model with an older watermark, the first load still running) the caller falls
back to the database query.

Each (user, item) keeps whether the user has a positive and/or an explicit negative event on it since the
watermark (``POSITIVE``/``NEGATIVE`` bits), so the serving core remakes a known user's vector from the view
alone (``events_for``), without a database read. ``recsys_recent_events_view_lag_seconds`` observes, on
every tick, how old the previous read is when this one completes: the longest an event written through
another worker can have waited before this worker sees it.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Collection, Iterable, Sequence
from functools import lru_cache
from typing import NamedTuple

from sqlalchemy import Connection, Engine, Row, Select, and_, bindparam, func, select

from app.api import metrics
from app.db.models import Event, Item, User

log = logging.getLogger("recsys.recent")

GAP_SECONDS = 60.0  # a skipped id still missing after this long was a rolled-back insert
MAX_GAPS = 5000  # skipped ids remembered at most (the newest win)
TAIL_BATCH = 100_000
MAX_OWN_RANGES = 32  # id ranges of this worker's own events left out of one tail read (the lowest win)
POSITIVE, NEGATIVE = 1, 2  # per (user, item): the kinds of event the user has on it since the watermark

NAMES_CHUNK = 5000  # internal ids per lookup of their external ids
# The events alone, their user and item ids named from a cache (_Names): joined to users and items in
# one statement, PostgreSQL's planner took the excluded id ranges for ~1 row and joined each of 129k rows
# to a scan of items (74 s of both cores per read after a minute of batches, 0.12 s without the join).
_ROWS = select(Event.id, Event.user_id, Event.item_id, Event.type)
_TAIL = _ROWS.where(Event.id > bindparam("after"), Event.id <= bindparam("upto")).order_by(Event.id)
_NEWEST = select(func.max(Event.id))
_SINCE = select(func.count()).select_from(Event).where(Event.id > bindparam("after"))
_GAPS = _ROWS.where(Event.id.in_(bindparam("ids", expanding=True)))
_USER_NAMES = select(User.id, User.external_id).where(User.id.in_(bindparam("ids", expanding=True)))
_ITEM_NAMES = select(Item.id, Item.external_id).where(Item.id.in_(bindparam("ids", expanding=True)))


@lru_cache(maxsize=MAX_OWN_RANGES + 1)
def _tail_without(ranges: int) -> Select:
    """The tail's read, leaving out ``ranges`` id ranges (bound as lo0, hi0, lo1, …)."""
    return _TAIL.where(and_(True, *(
        ~Event.id.between(bindparam(f"lo{k}"), bindparam(f"hi{k}")) for k in range(ranges)
    )))


def _runs(ids: Iterable[int]) -> list[tuple[int, int]]:
    """Ascending ids as (first, last) runs of consecutive ids."""
    runs: list[tuple[int, int]] = []
    for i in sorted(ids):
        if runs and i == runs[-1][1] + 1:
            runs[-1] = (runs[-1][0], i)
        else:
            runs.append((i, i))
    return runs


class _Names:
    """External ids of the internal user and item ids the tail reads, cached (an id names one user or
    item for good); misses are looked up in chunks, by primary key."""

    def __init__(self) -> None:
        self.users: dict[int, str] = {}
        self.items: dict[int, str] = {}

    def named(self, conn: Connection, rows: Sequence[Row]) -> list[tuple[int, str, str, str]]:
        """(id, user_id, item_id, type) rows with external ids."""
        users = self._fill(conn, _USER_NAMES, self.users, {r[1] for r in rows})
        items = self._fill(conn, _ITEM_NAMES, self.items, {r[2] for r in rows})
        return [(i, users[u], items[it], kind) for i, u, it, kind in rows]

    @staticmethod
    def _fill(conn: Connection, query: Select, cache: dict[int, str], ids: set[int]) -> dict[int, str]:
        missing = [i for i in ids if i not in cache]
        for start in range(0, len(missing), NAMES_CHUNK):
            cache.update(conn.execute(query, {"ids": missing[start:start + NAMES_CHUNK]}).all())
        return cache


class UserEvents(NamedTuple):
    """One user's items since the watermark, newest first: every one, positives, explicit negatives."""

    touched: list[str]
    positives: list[str]
    negatives: list[str]


class RecentEventsView:
    def __init__(
        self,
        engine: Engine,
        *,
        interval: float = 0.25,
        max_events: int = 2_000_000,
        negative_types: Collection[str] = ("dislike", "skip", "hide"),  # RECSYS_NEGATIVE_TYPES' default
    ) -> None:
        self.engine = engine
        self.interval = interval
        self.max_events = max_events
        self.negative_types = frozenset(negative_types)
        self._users: dict[str, dict[str, int]] = {}  # user → item → POSITIVE | NEGATIVE bits, oldest first
        self._count = 0  # events since the watermark, read or added; more than max_events: overflow
        self._last_id = 0
        self._gaps: dict[int, tuple[float, float]] = {}  # id skipped by the tail → (first missed, next lookup)
        self._own: list[tuple[int, int]] = []  # id runs of this worker's events above the tail, added already
        self._names = _Names()  # the tail thread's
        self._lock = threading.Lock()  # a rebuild's reset against a commit's rows and their id runs
        self.watermark: int | None = None  # None: not built yet
        self.overflow = False
        self._target: int | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # --- readers (request threads) ----------------------------------------------------------------
    def items_for(self, user_id: str, watermark: int) -> list[str] | None:
        """Items the user touched after ``watermark``, or None when the view cannot tell (ask the DB)."""
        current = self.watermark
        if current is None or self.overflow or current > watermark:
            return None
        items = self._users.get(user_id)
        return list(items) if items else []

    def events_for(self, user_id: str, watermark: int) -> UserEvents | None:
        """The user's items after ``watermark`` with their kind (newest first), or None (ask the DB)."""
        current = self.watermark
        if current is None or self.overflow or current > watermark:
            return None
        items = self._users.get(user_id)
        if not items:
            return UserEvents([], [], [])
        newest = list(items.items())[::-1]  # one C-level copy first: the tail thread may add meanwhile
        return UserEvents(
            [i for i, _ in newest],
            [i for i, kind in newest if kind & POSITIVE],
            [i for i, kind in newest if kind & NEGATIVE],
        )

    def add_committed(self, rows: Sequence[tuple[int, str, str, str]]) -> None:
        """Events (id, user, item, type) this worker just stored: visible to its next request without
        waiting for the tail, which then leaves their ids out of its reads."""
        if not rows or self.overflow:
            return
        with self._lock:
            self._add(rows)
            self._own.extend(_runs(r[0] for r in rows))

    # --- the tail thread ----------------------------------------------------------------------------
    def follow(self, watermark: int) -> None:
        """Track events newer than ``watermark`` (the served model's); rebuilt by the thread when it changes."""
        self._target = watermark

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="recent-events", daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(10)

    def _run(self) -> None:
        previous: float | None = None  # wall-clock start of the last read that succeeded
        while not self._stop.is_set():
            started: float | None = time.time()
            try:
                target = self._target
                if target is not None and target != self.watermark:
                    self._rebuild(target)
                elif self.watermark is not None and not self.overflow:
                    self._tail(self._last_id)
                    self._fill_gaps()
                else:  # nothing to follow, or overflowed: the database answers, no lag to report
                    started = None
                previous = None if started is None else self._note_read(started, previous)
            except Exception:  # a database hiccup must not end the thread
                log.exception("could not read recent events")
            self._stop.wait(self.interval)

    @staticmethod
    def _note_read(started: float, previous: float | None) -> float:
        """A read that began at ``started`` succeeded: every event committed before then is visible, and an
        event committed just after the previous read began waited until now."""
        if previous is not None:
            metrics.RECENT_VIEW_LAG.observe(time.time() - previous)
        metrics.RECENT_VIEW_READ_AT.set(started)
        return started

    def _rebuild(self, watermark: int) -> None:
        self.watermark = None  # readers fall back to the database meanwhile
        metrics.RECENT_VIEW_READY.set(0)
        with self._lock:  # this worker's events since are read back with the rest
            self._users, self._count, self._last_id, self.overflow = {}, 0, watermark, False
            self._gaps, self._own = {}, []
        self._names = _Names()
        # counted first: reading 2.3M events only to give up cost each worker 8 s of CPU, GIL held, at start
        with self.engine.connect() as conn:
            self._count = conn.execute(_SINCE, {"after": watermark}).scalar_one()
        if not self._check_size():
            self._count = 0
            self._tail(watermark)
        self.watermark = watermark
        metrics.RECENT_VIEW_READY.set(0 if self.overflow else 1)

    def _add(self, rows: Sequence[tuple[int, str, str, str]]) -> None:
        """Merge events (id, user, item, type), under ``_lock``. An item keeps the place of its first event
        (never removed and re-added, so a reader on another thread never misses it)."""
        users, negative_types = self._users, self.negative_types
        self._count += len(rows)
        for _, user, item, kind in rows:
            bucket = users.setdefault(user, {})
            bucket[item] = bucket.get(item, 0) | (NEGATIVE if kind in negative_types else POSITIVE)

    def _note_gaps(self, after: int, seen: Iterable[tuple[int, int]]) -> None:
        """Remember ids the tail jumped over (``seen``: ascending id runs it read or left out as this
        worker's own): they may still commit."""
        now, prev = time.monotonic(), after
        for first, last in seen:
            if first > prev + 1:
                for missing in range(max(prev + 1, first - MAX_GAPS), first):
                    self._gaps.setdefault(missing, (now, now))
            prev = max(prev, last)
        while len(self._gaps) > MAX_GAPS:
            del self._gaps[next(iter(self._gaps))]

    def _fill_gaps(self) -> None:
        """Look up the gaps that are due; one still missing is due again after as long as it has been."""
        now = time.monotonic()
        self._gaps = {i: t for i, t in self._gaps.items() if t[0] > now - GAP_SECONDS}
        due = [i for i, (_, at) in self._gaps.items() if at <= now]
        if not due:
            return
        with self.engine.connect() as conn:
            rows = self._names.named(conn, conn.execute(_GAPS, {"ids": due}).all())
        with self._lock:
            self._add(rows)
        for event_id, *_ in rows:
            self._gaps.pop(event_id, None)
        for i in due:
            if i in self._gaps:
                first = self._gaps[i][0]
                self._gaps[i] = (first, now + max(self.interval, now - first))
        self._check_size()

    def _check_size(self) -> bool:
        if self._count > self.max_events:
            self.overflow = True
            metrics.RECENT_VIEW_READY.set(0)
            with self._lock:
                self._users, self._gaps, self._own = {}, {}, []
            self._names = _Names()
            log.warning("too many events since the model's watermark; recommendations query the database")
        return self.overflow

    def _tail(self, after: int) -> None:
        """Read the events above ``after`` up to the newest committed one, in windows of ``TAIL_BATCH`` ids,
        so that a statement examines at most that many ids whatever plan the database picks: with stale
        statistics and the excluded ranges, PostgreSQL scanned and sorted every event above ``after`` for
        each batch (0.4 s a read a million events behind), and an open ``id > after`` with a large limit
        got a parallel sequential scan of the whole table on every tick (47 ms at 1.2M events)."""
        with self.engine.connect() as conn:  # one checkout for the whole read (PostgreSQL pings on each)
            newest = conn.execute(_NEWEST).scalar() or 0
            while after < newest:
                upto = min(after + TAIL_BATCH, newest)
                with self._lock:
                    own = sorted(r for r in self._own if r[1] > after and r[0] <= upto)[:MAX_OWN_RANGES]
                params = {"after": after, "upto": upto}
                for k, (first, last) in enumerate(own):
                    params |= {f"lo{k}": first, f"hi{k}": last}
                rows = self._names.named(conn, conn.execute(_tail_without(len(own)), params).all())
                with self._lock:
                    self._add(rows)
                seen = sorted([(r[0], r[0]) for r in rows] + [(f, min(last, upto)) for f, last in own])
                if upto < newest:  # a committed id lies above the window: its ids not seen are gaps
                    seen.append((upto + 1, upto + 1))
                self._note_gaps(after, seen)
                self._last_id = max(self._last_id, upto)
                with self._lock:
                    self._own = [r for r in self._own if r[1] > self._last_id]
                if self._check_size():
                    return
                after = upto
