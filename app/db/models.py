"""SQLAlchemy 2.x models: the schema both the service and the trainer read and write.

Timestamps of events are epoch seconds (UTC, float): the trainer sorts millions of them
and needs no timezone parsing; ``received_at`` is the server's wall clock.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Text,
    false,
    func,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

NAMING = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

# BIGINT on PostgreSQL, INTEGER on SQLite (where only INTEGER PRIMARY KEY autoincrements).
BigId = BigInteger().with_variant(Integer(), "sqlite")


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING)


class User(Base):
    __tablename__ = "users"

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    external_id: Mapped[str] = mapped_column(String(256), unique=True)
    attributes: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())


class Item(Base):
    __tablename__ = "items"

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    external_id: Mapped[str] = mapped_column(String(256), unique=True)
    attributes: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    hidden: Mapped[bool] = mapped_column(Boolean, default=False, server_default=false())
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())


class Event(Base):
    """One interaction or feedback. ``event_id`` is the client's idempotency key."""

    __tablename__ = "events"

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    event_id: Mapped[str] = mapped_column(String(128), unique=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"))
    item_id: Mapped[int] = mapped_column(ForeignKey("items.id", ondelete="CASCADE"))
    type: Mapped[str] = mapped_column(String(32))
    value: Mapped[float | None] = mapped_column(Float)
    timestamp: Mapped[float] = mapped_column(Float)
    received_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())

    __table_args__ = (
        Index("ix_events_timestamp", "timestamp"),
        # A user's events in id order (on SQLite the index's entries end with the rowid, events.id): what
        # serving reads for a user (events after a watermark, newest first; migration 0005)
        Index("ix_events_user_id", "user_id"),
        # No index on item_id: it cost as much as the row on every write (migration 0004).
    )


class Impression(Base):
    """One served list: what the service showed to whom, under which model and request.

    ``item_ids`` holds the internal item ids in rank order as a compact JSON array (``[12,7,31]``; rank 1
    first): one row and one index entry per list instead of one per item made the writer several times
    cheaper. There is no foreign key on the items; readers join ``items`` and so skip deleted ones.
    Only the request-id index is kept (time-ordered ids, so it is appended to); the trainer's reader
    scans the whole table anyway.
    """

    __tablename__ = "impressions"

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    request_id: Mapped[str] = mapped_column(String(64))
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"))
    model_version: Mapped[str | None] = mapped_column(String(128))
    item_ids: Mapped[str] = mapped_column(Text)
    served_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())

    __table_args__ = (Index("ix_impressions_request_id", "request_id"),)


class ModelVersion(Base):
    __tablename__ = "model_versions"

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    version: Mapped[str] = mapped_column(String(128), unique=True)
    path: Mapped[str] = mapped_column(String(1024))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())
    watermark: Mapped[int | None] = mapped_column(
        BigInteger, doc="Largest events.id the model was trained on."
    )
    metrics: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    status: Mapped[str] = mapped_column(String(16), default="candidate")
    promoted_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))

    __table_args__ = (Index("ix_model_versions_status", "status"),)


EVENT_TYPES_POSITIVE = ("view", "click", "like", "purchase", "rating", "add_to_cart", "share")
EVENT_TYPES_NEGATIVE = ("dislike", "skip", "hide")


class DashboardRevocation(Base):
    """A dashboard session signed out before its expiry. Kept in the database so that every worker and
    replica refuses its cookie, not only the one that answered the sign-out; rows past ``expires_at`` are
    deleted by later sign-outs (the cookie's own expiry refuses it by then)."""

    __tablename__ = "dashboard_revocations"

    sid: Mapped[str] = mapped_column(String(64), primary_key=True)
    expires_at: Mapped[int] = mapped_column(BigInteger)
