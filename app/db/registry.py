"""The model registry: which checkpoint versions exist, their metrics, and which one is promoted.

The trainer registers candidates here and the service follows the promoted one, so
promotion is a single-row status change that every API replica observes.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import Connection, select, update

from app.db.models import ModelVersion

STATUSES = ("candidate", "promoted", "rejected")


def _as_dict(row: ModelVersion) -> dict[str, Any]:
    return {
        "version": row.version,
        "path": row.path,
        "created_at": row.created_at,
        "watermark": row.watermark,
        "metrics": row.metrics or {},
        "status": row.status,
        "promoted_at": row.promoted_at,
    }


def _row(conn: Connection, version: str) -> Any:
    t = ModelVersion.__table__
    return conn.execute(select(t).where(t.c.version == version)).first()


def list_versions(conn: Connection) -> list[dict[str, Any]]:
    """All registered versions, newest first."""
    t = ModelVersion.__table__
    rows = conn.execute(select(t).order_by(t.c.created_at.desc(), t.c.id.desc())).all()
    return [_as_dict(r) for r in rows]  # type: ignore[arg-type]


def get_version(conn: Connection, version: str) -> dict[str, Any] | None:
    row = _row(conn, version)
    return _as_dict(row) if row is not None else None


def register(
    conn: Connection,
    version: str,
    path: str,
    *,
    watermark: int | None = None,
    metrics: dict[str, Any] | None = None,
    status: str = "candidate",
) -> dict[str, Any]:
    """Record a checkpoint as a version (idempotent on the version id); returns the stored row."""
    if status not in STATUSES:
        raise ValueError(f"status must be one of {STATUSES}")
    existing = get_version(conn, version)
    if existing is not None:
        return existing
    conn.execute(
        ModelVersion.__table__.insert().values(
            version=version, path=str(path), watermark=watermark, metrics=metrics or {}, status="candidate"
        )
    )
    if status == "promoted":
        promote(conn, version)
    elif status != "candidate":
        conn.execute(update(ModelVersion).where(ModelVersion.version == version).values(status=status))
    stored = get_version(conn, version)
    assert stored is not None
    return stored


def promote(conn: Connection, version: str) -> dict[str, Any]:
    """Make ``version`` the only promoted one; the previously promoted version returns to candidate."""
    if _row(conn, version) is None:
        raise KeyError(version)
    t = ModelVersion.__table__
    conn.execute(update(t).where(t.c.status == "promoted", t.c.version != version).values(status="candidate"))
    conn.execute(
        update(t).where(t.c.version == version).values(status="promoted", promoted_at=datetime.now(UTC))
    )
    stored = get_version(conn, version)
    assert stored is not None
    return stored


def current_promoted(conn: Connection) -> dict[str, Any] | None:
    """The promoted version (the most recently promoted one, should several ever be marked)."""
    t = ModelVersion.__table__
    row = conn.execute(
        select(t).where(t.c.status == "promoted").order_by(t.c.promoted_at.desc(), t.c.id.desc()).limit(1)
    ).first()
    return _as_dict(row) if row is not None else None  # type: ignore[arg-type]


def rollback_plan(conn: Connection) -> tuple[str, str]:
    """(current, previous): the promoted version and the candidate promoted most recently before it, which a
    roll-back serves again. ValueError, with the reason, when there is nothing to roll back to."""
    current = current_promoted(conn)
    if current is None:
        raise ValueError("no version is promoted: nothing to roll back")
    earlier = sorted(
        (
            v
            for v in list_versions(conn)
            if v["promoted_at"] and v["status"] == "candidate" and v["version"] != current["version"]
        ),
        key=lambda v: v["promoted_at"],
    )
    if not earlier:
        raise ValueError(f"{current['version']} is the only version ever promoted: nothing to roll back to")
    return current["version"], earlier[-1]["version"]


def reject(conn: Connection, version: str) -> None:
    """Mark a version rejected (a rolled-back one): it is never served again unless promoted by hand."""
    t = ModelVersion.__table__
    conn.execute(update(t).where(t.c.version == version).values(status="rejected"))
