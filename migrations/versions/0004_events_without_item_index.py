"""events: drop the index on item_id, the most expensive part of every event write

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-03

Every event written dirtied a random page of each secondary index on ``events``. The ``item_id`` index
served only the dashboard's item page (and ON DELETE CASCADE from items, which the service never runs:
items are hidden, not deleted), yet it cost about as much as the row itself: on SQLite a commit of 5000
events took 100 ms without it against 177 ms with it, one of 8 events 0.58 ms against 0.94 ms
(docs/benchmarks.md, event ingestion). The item page now reads every event (0.16 s at 2M on SQLite).
"""

from __future__ import annotations

from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.drop_index("ix_events_item_id", table_name="events")


def downgrade() -> None:
    op.create_index("ix_events_item_id", "events", ["item_id"])
