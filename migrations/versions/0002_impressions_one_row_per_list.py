"""impressions: one row per served list

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-24

One row per served item (two secondary indexes) cost the writer ~0.1 ms of SQLite CPU per list of 10,
a third of a serving process's CPU. Now each list is one row whose ``item_ids`` holds the internal item
ids in rank order as a JSON array; only the request-id index stays. Existing rows are converted both
ways: the old table goes to a plain staging copy, the new one is created with the canonical names, and
rows are streamed across in pages.

Upgrading, old rows are read in (request_id, id) order: ids of one list need not be consecutive when two
workers wrote at once on PostgreSQL. A list is a run of rows with the same request, user and model whose
ranks count up from 1; a rank that does not follow the previous one starts a new list, so a request id a
client reused is not merged into one list. ``served_at`` of a list is that of its first row. Downgrading
drops served items that were deleted from ``items`` since (the old table had a foreign key on them).
"""

from __future__ import annotations

from collections.abc import Iterator

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

BigId = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
STAGING = "_impressions_staging"
CHUNK = 20_000


def _rows(conn: sa.Connection, columns: str, by_request: bool) -> Iterator[sa.Row]:
    """The staging table's rows in (request_id, id) or id order, read in keyset pages."""
    order = "request_id, id" if by_request else "id"
    after = "(request_id, id) > (:r, :i)" if by_request else "id > :i"  # row values: an index range
    last: dict = {}
    while True:
        where = f"WHERE {after} " if last else ""
        page = conn.execute(
            sa.text(f"SELECT id, {columns} FROM {STAGING} {where}ORDER BY {order} LIMIT {CHUNK}"), last
        ).all()
        if not page:
            return
        yield from page
        last = {"i": page[-1].id} | ({"r": page[-1].request_id} if by_request else {})


def _stage(conn: sa.Connection, columns: str, order: str) -> None:
    """Copy impressions to a staging table indexed for the paged read, then drop the original."""
    conn.execute(sa.text(f"CREATE TABLE {STAGING} AS SELECT id, {columns} FROM impressions"))
    conn.execute(sa.text(f"CREATE INDEX ix{STAGING} ON {STAGING} ({order})"))
    op.drop_table("impressions")


def _common_columns() -> list[sa.Column]:
    return [
        sa.Column("id", BigId, nullable=False),
        sa.Column("request_id", sa.String(length=64), nullable=False),
        sa.Column("user_id", BigId, nullable=False),
    ]


def _served_at() -> sa.Column:
    return sa.Column(
        "served_at", sa.DateTime(timezone=True), server_default=sa.text("(CURRENT_TIMESTAMP)"), nullable=False
    )


def _user_fk() -> sa.ForeignKeyConstraint:
    return sa.ForeignKeyConstraint(
        ["user_id"], ["users.id"], name=op.f("fk_impressions_user_id_users"), ondelete="CASCADE"
    )


def _insert(conn: sa.Connection, sql: str, rows: list[dict]) -> None:
    if rows:
        conn.execute(sa.text(sql), rows)
        rows.clear()


def upgrade() -> None:
    conn = op.get_bind()
    _stage(conn, "request_id, user_id, item_id, model_version, rank, served_at", "request_id, id")
    op.create_table(
        "impressions",
        *_common_columns(),
        sa.Column("model_version", sa.String(length=128), nullable=True),
        sa.Column("item_ids", sa.Text(), nullable=False),
        _served_at(),
        _user_fk(),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_impressions")),
    )
    sql = (
        "INSERT INTO impressions (request_id, user_id, model_version, item_ids, served_at) "
        "VALUES (:request_id, :user_id, :model_version, :item_ids, :served_at)"
    )
    out: list[dict] = []
    current: dict | None = None
    for row in _rows(conn, "request_id, user_id, item_id, model_version, rank, served_at", True):
        key = (row.request_id, row.user_id, row.model_version)
        if current is None or current["key"] != key or row.rank != current["rank"] + 1:
            if current is not None:
                out.append(_finish(current))
            current = {"key": key, "rank": row.rank, "items": [row.item_id], "served_at": row.served_at}
        else:
            current["rank"] = row.rank
            current["items"].append(row.item_id)
        if len(out) >= CHUNK:
            _insert(conn, sql, out)
    if current is not None:
        out.append(_finish(current))
    _insert(conn, sql, out)
    op.drop_table(STAGING)
    op.create_index("ix_impressions_request_id", "impressions", ["request_id"], unique=False)


def _finish(current: dict) -> dict:
    request_id, user_id, model_version = current["key"]
    return {
        "request_id": request_id,
        "user_id": user_id,
        "model_version": model_version,
        "item_ids": "[" + ",".join(str(int(i)) for i in current["items"]) + "]",
        "served_at": current["served_at"],
    }


def downgrade() -> None:
    conn = op.get_bind()
    _stage(conn, "request_id, user_id, model_version, item_ids, served_at", "id")
    op.create_table(
        "impressions",
        *_common_columns(),
        sa.Column("item_id", BigId, nullable=False),
        sa.Column("model_version", sa.String(length=128), nullable=True),
        sa.Column("rank", sa.Integer(), nullable=False),
        _served_at(),
        sa.ForeignKeyConstraint(
            ["item_id"], ["items.id"], name=op.f("fk_impressions_item_id_items"), ondelete="CASCADE"
        ),
        _user_fk(),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_impressions")),
    )
    sql = (
        "INSERT INTO impressions (request_id, user_id, item_id, model_version, rank, served_at) "
        "SELECT :request_id, :user_id, :item_id, :model_version, :rank, :served_at "
        "WHERE EXISTS (SELECT 1 FROM items WHERE id = :item_id)"
    )
    out: list[dict] = []
    for row in _rows(conn, "request_id, user_id, model_version, item_ids, served_at", False):
        inner = row.item_ids.strip()[1:-1].strip()
        for rank, item in enumerate(inner.split(",") if inner else [], start=1):
            out.append(
                {
                    "request_id": row.request_id,
                    "user_id": row.user_id,
                    "item_id": int(item),
                    "model_version": row.model_version,
                    "rank": rank,
                    "served_at": row.served_at,
                }
            )
        if len(out) >= CHUNK:
            _insert(conn, sql, out)
    _insert(conn, sql, out)
    op.drop_table(STAGING)
    op.create_index("ix_impressions_request_id", "impressions", ["request_id"], unique=False)
    op.create_index("ix_impressions_user_id_served_at", "impressions", ["user_id", "served_at"], unique=False)
