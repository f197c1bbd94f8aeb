"""Each worker's in-memory view of events newer than the served model's watermark.

Excluding what a user saw since training would cost one database query per recommendation; instead a
background thread tails the events table every ``interval`` seconds and this worker's own POSTs are
added on commit. A PostgreSQL transaction can commit after one with a higher id: the ids skipped over
are remembered as gaps and looked up again on every tick until they appear or ``GAP_SECONDS`` pass (a
rolled-back insert never appears). Re-reading a fixed window of recent ids instead cost each worker
~20k rows a second, and the event loop its GIL, whether anything had been written or not. Staleness: an event written through another worker or process is excluded within about
``interval`` seconds. When the view cannot answer (too many events since the watermark, a model with an
older watermark, the first load still running) the caller falls back to the database query.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterable, Sequence

from sqlalchemy import Engine, bindparam, select

from app.api import metrics
from app.db.models import Event, Item, User

log = logging.getLogger("recsys.recent")

GAP_SECONDS = 60.0  # a skipped id still missing after this long was a rolled-back insert
MAX_GAPS = 5000  # skipped ids remembered at most (the newest win)
TAIL_BATCH = 100_000

_ROWS = (
    select(Event.id, User.external_id, Item.external_id)
    .join(User, User.id == Event.user_id)
    .join(Item, Item.id == Event.item_id)
)
_TAIL = _ROWS.where(Event.id > bindparam("after")).order_by(Event.id).limit(TAIL_BATCH)
_GAPS = _ROWS.where(Event.id.in_(bindparam("ids", expanding=True)))


class RecentEventsView:
    def __init__(self, engine: Engine, *, interval: float = 0.25, max_events: int = 2_000_000) -> None:
        self.engine = engine
        self.interval = interval
        self.max_events = max_events
        self._users: dict[str, dict[str, None]] = {}
        self._count = 0
        self._last_id = 0
        self._gaps: dict[int, float] = {}  # id skipped by the tail → when it was first missed
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

    def add_local(self, pairs: Iterable[tuple[str, str]]) -> None:
        """Events this worker just committed: visible to its next request without waiting for the tail."""
        for user, item in pairs:
            self._users.setdefault(user, {})[item] = None

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
        while not self._stop.is_set():
            try:
                target = self._target
                if target is not None and target != self.watermark:
                    self._rebuild(target)
                elif self.watermark is not None and not self.overflow:
                    self._tail(self._last_id)
                    self._fill_gaps()
            except Exception:  # a database hiccup must not end the thread
                log.exception("could not read recent events")
            self._stop.wait(self.interval)

    def _rebuild(self, watermark: int) -> None:
        self.watermark = None  # readers fall back to the database meanwhile
        metrics.RECENT_VIEW_READY.set(0)
        self._users, self._count, self._last_id, self.overflow = {}, 0, watermark, False
        self._gaps = {}
        self._tail(watermark)
        self.watermark = watermark
        metrics.RECENT_VIEW_READY.set(0 if self.overflow else 1)

    def _add(self, rows: Sequence[tuple[int, str, str]]) -> None:
        users = self._users
        for _, user, item in rows:
            bucket = users.setdefault(user, {})
            if item not in bucket:
                bucket[item] = None
                self._count += 1

    def _note_gaps(self, after: int, ids: Iterable[int]) -> None:
        """Remember ids the tail jumped over (ascending ``ids``): they may still commit."""
        now, prev = time.monotonic(), after
        for event_id in ids:
            if event_id > prev + 1:
                for missing in range(max(prev + 1, event_id - MAX_GAPS), event_id):
                    self._gaps.setdefault(missing, now)
            prev = max(prev, event_id)
        while len(self._gaps) > MAX_GAPS:
            del self._gaps[next(iter(self._gaps))]

    def _fill_gaps(self) -> None:
        if not self._gaps:
            return
        with self.engine.connect() as conn:
            rows = conn.execute(_GAPS, {"ids": list(self._gaps)}).all()
        self._add(rows)
        for event_id, _, _ in rows:
            self._gaps.pop(event_id, None)
        cutoff = time.monotonic() - GAP_SECONDS
        self._gaps = {i: t for i, t in self._gaps.items() if t > cutoff}
        self._check_size()

    def _check_size(self) -> bool:
        if self._count > self.max_events:
            self.overflow = True
            metrics.RECENT_VIEW_READY.set(0)
            self._users, self._gaps = {}, {}
            log.warning("too many events since the model's watermark; recommendations query the database")
        return self.overflow

    def _tail(self, after: int) -> None:
        while True:
            with self.engine.connect() as conn:
                rows = conn.execute(_TAIL, {"after": after}).all()
            self._add(rows)
            self._note_gaps(after, (r[0] for r in rows))
            if rows:
                self._last_id = max(self._last_id, rows[-1][0])
            if self._check_size() or len(rows) < TAIL_BATCH:
                return
            after = rows[-1][0]
