"""Item and user attributes, the hidden flag, and the non-personalised lists (popular, latest).

Attributes are free JSON objects; the service reads two keys of an item's attributes to filter by
category: ``categories`` (a list of strings) and ``category`` (one string). Upserts use
``INSERT … ON CONFLICT (external_id) DO UPDATE`` on both backends.
"""

from __future__ import annotations

from collections.abc import Collection
from datetime import datetime
from typing import Any

from sqlalchemy import Connection, func, select
from sqlalchemy.dialects import postgresql, sqlite

from app.db.models import Event, Item, User


def categories_of(attributes: Any) -> list[str]:
    """The categories an item belongs to: ``attributes.categories`` (strings) plus ``attributes.category``."""
    if not isinstance(attributes, dict):
        return []
    out: list[str] = []
    many = attributes.get("categories")
    if isinstance(many, list):
        out.extend(c for c in many if isinstance(c, str))
    one = attributes.get("category")
    if isinstance(one, str):
        out.append(one)
    return list(dict.fromkeys(out))


def item_categories(conn: Connection) -> dict[str, list[str]]:
    """External item id → its categories, for every item that has at least one (read at model load)."""
    rows = conn.execute(select(Item.external_id, Item.attributes).where(Item.attributes.is_not(None)))
    out: dict[str, list[str]] = {}
    for external_id, attributes in rows:
        cats = categories_of(attributes)
        if cats:
            out[external_id] = cats
    return out


def _upsert(
    conn: Connection, model: type[Item] | type[User], external_id: str, values: dict[str, Any]
) -> None:
    dialect = postgresql if conn.dialect.name == "postgresql" else sqlite
    stmt = dialect.insert(model.__table__).values(external_id=external_id, **values)
    if values:
        stmt = stmt.on_conflict_do_update(index_elements=["external_id"], set_=values)
    else:
        stmt = stmt.on_conflict_do_nothing(index_elements=["external_id"])
    conn.execute(stmt)


def put_item(
    conn: Connection, external_id: str, attributes: dict[str, Any] | None, hidden: bool | None
) -> None:
    """Create or update an item; ``None`` leaves a field as it is (a new item: no attributes, visible)."""
    values: dict[str, Any] = {}
    if attributes is not None:
        values["attributes"] = attributes
    if hidden is not None:
        values["hidden"] = hidden
    _upsert(conn, Item, external_id, values)


def put_user(conn: Connection, external_id: str, attributes: dict[str, Any] | None) -> None:
    _upsert(conn, User, external_id, {} if attributes is None else {"attributes": attributes})


def _iso(value: Any) -> str | None:
    if isinstance(value, datetime):
        return value.isoformat()
    return None if value is None else str(value)


def get_item(conn: Connection, external_id: str) -> dict[str, Any] | None:
    row = conn.execute(
        select(Item.attributes, Item.hidden, Item.created_at).where(Item.external_id == external_id)
    ).first()
    if row is None:
        return None
    return {
        "item_id": external_id,
        "attributes": row[0] or {},
        "hidden": bool(row[1]),
        "created_at": _iso(row[2]),
    }


def get_user(conn: Connection, external_id: str) -> dict[str, Any] | None:
    row = conn.execute(
        select(User.attributes, User.created_at).where(User.external_id == external_id)
    ).first()
    if row is None:
        return None
    return {"user_id": external_id, "attributes": row[0] or {}, "created_at": _iso(row[1])}


def popular_items(
    conn: Connection, since: float, negative_types: Collection[str], limit: int
) -> list[tuple[str, int]]:
    """Visible items by number of positive events with ``events.timestamp >= since``, most first.

    Ties are broken by item id so the order is stable. Uses the index on ``events.timestamp``.
    """
    count = func.count().label("n")
    stmt = (
        select(Item.external_id, count)
        .select_from(Event)
        .join(Item, Item.id == Event.item_id)
        .where(Event.timestamp >= since, Item.hidden.is_(False))
        .group_by(Item.id, Item.external_id)
        .order_by(count.desc(), Item.id)
        .limit(limit)
    )
    if negative_types:
        stmt = stmt.where(Event.type.not_in(sorted(negative_types)))
    return [(r[0], int(r[1])) for r in conn.execute(stmt)]


def latest_items(conn: Connection, limit: int) -> list[tuple[str, str | None]]:
    """Visible items, newest ``created_at`` first (ties: the later-inserted row first)."""
    stmt = (
        select(Item.external_id, Item.created_at)
        .where(Item.hidden.is_(False))
        .order_by(Item.created_at.desc(), Item.id.desc())
        .limit(limit)
    )
    return [(r[0], _iso(r[1])) for r in conn.execute(stmt)]
