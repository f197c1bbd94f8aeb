"""events: index user_id alone instead of (user_id, timestamp)

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-06

Every event written inserts an entry at a random place of the user index (its user is any user), so
that index is the largest cost of a batch write: on SQLite, 1000 events took 6 ms without it against
26-37 ms with it. Without the timestamp its entries are smaller, so a batch dirties fewer pages (with
the committer's rows in user order, 1000 events 27-29 against 37 ms; docs/benchmarks.md). The reader
that matters is serving's (``app/db/userdata.py``: a user's events after a watermark, newest first by
id), which on SQLite the new index answers in order, since its entries end with the rowid; the
dashboard's user page sorts one user's events by time itself.
"""

from __future__ import annotations

from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def _replace_index(new: str, columns: list[str], old: str) -> None:
    """Build ``new`` before dropping ``old``, so that a user's events stay indexed throughout. PostgreSQL
    builds it CONCURRENTLY (outside a transaction): event writes go on during the build instead of
    waiting for it, minutes on a large table."""
    if op.get_bind().dialect.name != "postgresql":
        op.create_index(new, "events", columns)
        op.drop_index(old, table_name="events")
        return
    with op.get_context().autocommit_block():
        op.create_index(new, "events", columns, postgresql_concurrently=True, if_not_exists=True)
        op.drop_index(old, table_name="events", postgresql_concurrently=True, if_exists=True)


def upgrade() -> None:
    _replace_index("ix_events_user_id", ["user_id"], "ix_events_user_id_timestamp")


def downgrade() -> None:
    _replace_index("ix_events_user_id_timestamp", ["user_id", "timestamp"], "ix_events_user_id")
