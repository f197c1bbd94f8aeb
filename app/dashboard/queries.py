"""The dashboard's database reads: counts, events over time, a user's history, an item's activity.

Read-only and index-backed (events by timestamp, by user and timestamp, by item), so a page stays cheap
on a large log. Time buckets are computed in SQL from the events' epoch-second timestamps, the same way
on SQLite and PostgreSQL.
"""

from __future__ import annotations

import time
from typing import Any

from sqlalchemy import BigInteger, Connection, cast, func, literal_column, select

from app.db.models import Event, Item, User

HOUR, DAY = 3600, 86400


def counts(conn: Connection) -> dict[str, int]:
    return {
        name: int(conn.execute(select(func.count()).select_from(table)).scalar() or 0)
        for name, table in (("users", User), ("items", Item), ("events", Event))
    }


def _window_end(newest: float | None, now: float) -> float:
    """The end of a "last days" window: now, or the newest event when the log is older (an import)."""
    return now if newest is None or newest >= now else float(newest)


def _buckets(conn: Connection, size: int, start: float, end: float, *where: Any) -> dict[int, int]:
    bucket = (cast(Event.timestamp, BigInteger) // literal_column(str(size))).label("bucket")
    rows = conn.execute(
        select(bucket, func.count())
        .where(Event.timestamp >= start, Event.timestamp < end, *where)
        .group_by(literal_column("bucket"))
    ).all()
    return {int(b): int(c) for b, c in rows}


def _series(found: dict[int, int], size: int, first: int, n: int) -> list[tuple[int, int]]:
    return [((first + i) * size, found.get(first + i, 0)) for i in range(n)]


def events_per_hour(conn: Connection, hours: int = 7 * 24, now: float | None = None) -> list[tuple[int, int]]:
    """(hour start, events) for the last ``hours`` hours, by the events' own timestamps; the window ends
    at the newest event instead of now when every event is older (a log imported from the past)."""
    newest = conn.execute(select(func.max(Event.timestamp))).scalar()
    end = _window_end(newest, time.time() if now is None else now)
    last = int(end) // HOUR
    first = last - hours + 1
    found = _buckets(conn, HOUR, first * HOUR, (last + 1) * HOUR)
    return _series(found, HOUR, first, hours)


def user_history(conn: Connection, user_id: str, limit: int = 50) -> tuple[int, list[dict[str, Any]]]:
    """(all events of the user, the newest ``limit`` of them)."""
    uid = conn.execute(select(User.id).where(User.external_id == user_id)).scalar()
    if uid is None:
        return 0, []
    total = int(conn.execute(select(func.count()).where(Event.user_id == uid)).scalar() or 0)
    rows = conn.execute(
        select(Item.external_id, Event.type, Event.value, Event.timestamp)
        .join(Item, Item.id == Event.item_id)
        .where(Event.user_id == uid)
        .order_by(Event.timestamp.desc(), Event.id.desc())
        .limit(limit)
    ).all()
    return total, [{"item_id": r[0], "type": r[1], "value": r[2], "timestamp": r[3]} for r in rows]


def find_ids(conn: Connection, prefix: str, limit: int = 20) -> tuple[list[str], list[str]]:
    """Users and items whose id starts with ``prefix`` (the search box), shortest ids first."""
    escaped = prefix.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")

    def ids(table: Any) -> list[str]:
        col = table.external_id
        return list(
            conn.execute(
                select(col)
                .where(col.like(escaped + "%", escape="\\"))
                .order_by(func.length(col), col)
                .limit(limit)
            ).scalars()
        )

    return ids(User), ids(Item)


def item_activity(conn: Connection, item_id: str, days: int = 60, now: float | None = None) -> dict[str, Any]:
    """An item's event count, distinct users, and (day start, events) for the last ``days`` days.

    Reads every event: ``events`` has no index on ``item_id``, which would tax every write for this page
    (about 0.16 s at 2M events on SQLite; migration 0004).
    """
    iid = conn.execute(select(Item.id).where(Item.external_id == item_id)).scalar()
    if iid is None:
        return {"events": 0, "users": 0, "per_day": []}
    total, users, newest = conn.execute(
        select(func.count(), func.count(func.distinct(Event.user_id)), func.max(Event.timestamp)).where(
            Event.item_id == iid
        )
    ).one()
    end = _window_end(newest, time.time() if now is None else now)
    last = int(end) // DAY
    first = last - days + 1
    found = _buckets(conn, DAY, first * DAY, (last + 1) * DAY, Event.item_id == iid)
    return {"events": int(total), "users": int(users), "per_day": _series(found, DAY, first, days)}
