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


class RegistryError(ValueError):
    """A registry change that cannot be made: nothing to roll back to, or the registry changed meanwhile."""


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


def promoted_history(conn: Connection) -> list[dict[str, Any]]:
    """The promoted version first, then the versions promoted before it and not rejected since, most
    recent promotion first."""
    t = ModelVersion.__table__
    rows = conn.execute(
        select(t)
        .where(t.c.promoted_at.is_not(None), t.c.status != "rejected")
        .order_by(t.c.promoted_at.desc(), t.c.id.desc())
    ).all()
    found = [_as_dict(r) for r in rows]  # type: ignore[arg-type]
    return sorted(found, key=lambda v: v["status"] != "promoted")  # stable: keeps the promotion order


def rollback_plan(conn: Connection) -> tuple[str, str]:
    """(current, previous): the promoted version and the one promoted most recently before it (and not
    rejected since), which a roll-back serves again. RegistryError, with the reason, when there is none."""
    history = promoted_history(conn)
    if not history or history[0]["status"] != "promoted":
        raise RegistryError("no version is promoted: nothing to roll back")
    if len(history) < 2:
        raise RegistryError(f"{history[0]['version']} is the only version ever promoted: nothing to roll back to")
    return history[0]["version"], history[1]["version"]


def reject(conn: Connection, version: str) -> None:
    """Mark a version rejected (a rolled-back one): it is never served again unless promoted by hand."""
    t = ModelVersion.__table__
    conn.execute(update(t).where(t.c.version == version).values(status="rejected"))


def rollback(conn: Connection, *, to: str | None = None) -> tuple[str, str]:
    """Serve again the version promoted before the current one and mark the current one rejected, both in
    the caller's transaction, so a failure half-way changes nothing; returns (rejected, promoted).
    ``to``: the version the caller checked (its checkpoint loads); RegistryError if the plan changed."""
    current, previous = rollback_plan(conn)
    if to is not None and previous != to:
        raise RegistryError(f"the registry changed: rolling back would now promote {previous}, not {to}")
    reject(conn, current)
    promote(conn, previous)
    return current, previous
