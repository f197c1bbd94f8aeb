"""The few per-request database reads: a user's events since the model was trained, hidden items.

Kept to one indexed query per recommendation (events by user id, newer than the watermark),
so exclusion of freshly seen items and fold-in for cold users stay cheap on both backends.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass, field

from sqlalchemy import Connection, bindparam, select

from app.db.models import Event, Item, User

RECENT_LIMIT = 1000  # newest events read per request; older ones are in the checkpoint's seen set


@dataclass(frozen=True)
class RecentEvents:
    """A user's events newer than a watermark, newest first."""

    known: bool  # the user has events newer than the watermark
    item_ids: list[str]  # every item the user touched
    positive_item_ids: list[str]  # items with a non-negative event type (fold-in input)
    negative_item_ids: list[str] = field(default_factory=list)  # items with a RECSYS_NEGATIVE_TYPES event


_RECENT = (
    select(Item.external_id, Event.type)
    .select_from(User)
    .join(Event, Event.user_id == User.id)
    .join(Item, Item.id == Event.item_id)
    .where(User.external_id == bindparam("user_id"), Event.id > bindparam("since_id"))
    .order_by(Event.id.desc())
    .limit(RECENT_LIMIT)
)


def recent_events(
    conn: Connection, user_id: str, since_id: int, negative_types: Collection[str]
) -> RecentEvents:
    """One indexed query, built once (users.external_id, then events by user id and id)."""
    rows = conn.execute(_RECENT, {"user_id": user_id, "since_id": since_id}).all()
    items = [r[0] for r in rows]
    positive = [r[0] for r in rows if r[1] not in negative_types]
    negative = [r[0] for r in rows if r[1] in negative_types]
    return RecentEvents(bool(rows), items, positive, negative)


def negative_feedback(
    conn: Connection, user_id: str, negative_types: Collection[str], limit: int = 1000
) -> list[str]:
    """Items the user explicitly rejected (RECSYS_NEGATIVE_TYPES), newest first, without repeats."""
    rows = conn.execute(
        select(Item.external_id)
        .join(Event, Event.item_id == Item.id)
        .join(User, User.id == Event.user_id)
        .where(User.external_id == user_id, Event.type.in_(list(negative_types)))
        .order_by(Event.id.desc())
        .limit(limit)
    ).all()
    return list(dict.fromkeys(r[0] for r in rows))


def user_exists(conn: Connection, user_id: str) -> bool:
    return conn.execute(select(User.id).where(User.external_id == user_id)).scalar() is not None


def hidden_items(conn: Connection) -> list[str]:
    return list(conn.execute(select(Item.external_id).where(Item.hidden.is_(True))).scalars())
