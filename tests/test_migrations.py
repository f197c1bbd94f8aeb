"""Migrations run up and down on SQLite and PostgreSQL; a stale schema is refused with the fix."""

from __future__ import annotations

import pytest
from sqlalchemy import inspect

from app.db.engine import SchemaError, make_engine
from app.db.migrate import checked_engine, current_revision, downgrade, head_revision, upgrade

TABLES = {"users", "items", "events", "impressions", "model_versions", "dashboard_revocations"}


def test_upgrade_creates_schema_and_downgrade_removes_it(db_url: str) -> None:
    upgrade(db_url)
    engine = make_engine(db_url)
    assert set(inspect(engine).get_table_names()) >= TABLES
    assert current_revision(engine) == head_revision()
    event_indexes = {ix["name"] for ix in inspect(engine).get_indexes("events")}
    assert {"ix_events_timestamp", "ix_events_user_id"} <= event_indexes
    assert "ix_events_item_id" not in event_indexes  # dropped by 0004: it taxed every write
    assert "ix_events_user_id_timestamp" not in event_indexes  # user_id alone since 0005: cheaper writes

    downgrade(db_url, "base")
    assert not TABLES & set(inspect(engine).get_table_names())
    assert current_revision(engine) is None
    upgrade(db_url)  # and back up again
    assert current_revision(engine) == head_revision()
    engine.dispose()


def test_stale_schema_is_refused_with_the_fixing_command(db_url: str) -> None:
    with pytest.raises(SchemaError, match="recsys db upgrade"):
        checked_engine(db_url)
    upgrade(db_url)
    checked_engine(db_url).dispose()


def test_sqlite_runs_in_wal_mode_with_foreign_keys(tmp_path) -> None:  # noqa: ANN001
    url = f"sqlite:///{tmp_path / 'x' / 'recsys.db'}"
    upgrade(url)
    engine = make_engine(url)
    with engine.connect() as conn:
        assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
        assert conn.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1
    engine.dispose()


def test_a_users_recent_events_are_read_through_the_user_index_in_id_order(tmp_path) -> None:  # noqa: ANN001
    """Serving's read (a user's events after a watermark, newest first) is an index range, no sort."""
    from app.db.userdata import _RECENT

    url = f"sqlite:///{tmp_path / 'plan.db'}"
    upgrade(url)
    engine = make_engine(url)
    with engine.connect() as conn:
        plan = [row[3] for row in conn.exec_driver_sql("EXPLAIN QUERY PLAN " + str(_RECENT.compile(engine)),
                                                       ("u1", 5, 100, 0)).all()]
    engine.dispose()
    assert "SEARCH events USING INDEX ix_events_user_id (user_id=? AND rowid>?)" in plan
    assert not any("TEMP B-TREE" in step for step in plan), plan
