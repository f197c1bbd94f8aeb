"""dashboard_revocations: sessions signed out before they expire, shared by every worker

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-02

A sign-out used to revoke its session only in the answering worker's memory, so with two workers the same
cookie still opened the dashboard on the other one until it expired.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "dashboard_revocations",
        sa.Column("sid", sa.String(length=64), nullable=False),
        sa.Column("expires_at", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("sid", name=op.f("pk_dashboard_revocations")),
    )


def downgrade() -> None:
    op.drop_table("dashboard_revocations")
