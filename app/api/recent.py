"""Each worker's in-memory view of events newer than the served model's watermark.

Excluding what a user saw since training would cost one database query per recommendation; instead a
background thread tails the events table every ``interval`` seconds (re-reading a window of recent ids,
so a PostgreSQL transaction that commits out of id order is not missed) and this worker's own POSTs are
added on commit. Staleness: an event written through another worker or process is excluded within about
``interval`` seconds. When the view cannot answer (too many events since the watermark, a model with an
older watermark, the first load still running) the caller falls back to the database query.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterable

from sqlalchemy import Engine, bindparam, select

from app.db.models import Event, Item, User

log = logging.getLogger("recsys.recent")

LOOKBACK_IDS = 5000  # ids re-read on every tick: covers transactions that commit out of id order
TAIL_BATCH = 100_000

_TAIL = (
    select(Event.id, User.external_id, Item.external_id)
    .join(User, User.id == Event.user_id)
    .join(Item, Item.id == Event.item_id)
    .where(Event.id > bindparam("after"))
    .order_by(Event.id)
    .limit(TAIL_BATCH)
)


class RecentEventsView:
    def __init__(self, engine: Engine, *, interval: float = 0.25, max_events: int = 2_000_000) -> None:
        self.engine = engine
        self.interval = interval
        self.max_events = max_events
        self._users: dict[str, dict[str, None]] = {}
        self._count = 0
        self._last_id = 0
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
                    self._tail(max(self.watermark, self._last_id - LOOKBACK_IDS))
            except Exception:  # a database hiccup must not end the thread
                log.exception("could not read recent events")
            self._stop.wait(self.interval)

    def _rebuild(self, watermark: int) -> None:
        self.watermark = None  # readers fall back to the database meanwhile
        self._users, self._count, self._last_id, self.overflow = {}, 0, watermark, False
        self._tail(watermark)
        self.watermark = watermark

    def _tail(self, after: int) -> None:
        while True:
            with self.engine.connect() as conn:
                rows = conn.execute(_TAIL, {"after": after}).all()
            users = self._users
            for event_id, user, item in rows:
                bucket = users.setdefault(user, {})
                if item not in bucket:
                    bucket[item] = None
                    self._count += 1
                if event_id > self._last_id:
                    self._last_id = event_id
            if self._count > self.max_events:
                self.overflow = True
                self._users = {}
                log.warning("too many events since the model's watermark; recommendations query the database")
                return
            if len(rows) < TAIL_BATCH:
                return
            after = rows[-1][0]
