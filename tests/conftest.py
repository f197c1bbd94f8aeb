"""Shared fixtures: a fresh SQLite database per test and, when configured, a throwaway PostgreSQL database.

PostgreSQL tests run when RECSYS_TEST_POSTGRES_URL is set (CI sets it) and skip with that reason otherwise.
Each test session gets its own database, so parallel runs never share state.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator

import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url

PG_ENV = "RECSYS_TEST_POSTGRES_URL"


def _pg_base_url() -> str | None:
    url = os.environ.get(PG_ENV)
    if not url:
        return None
    for prefix in ("postgresql://", "postgres://"):
        if url.startswith(prefix):
            url = "postgresql+psycopg://" + url[len(prefix) :]
    return url


@pytest.fixture(scope="session")
def postgres_url() -> Iterator[str]:
    """URL of a new, empty PostgreSQL database, dropped at the end of the session."""
    base = _pg_base_url()
    if base is None:
        pytest.skip(f"PostgreSQL tests need {PG_ENV} (e.g. postgresql://postgres@127.0.0.1:5432/test)")
    name = f"recsys_test_{uuid.uuid4().hex[:10]}"
    admin = create_engine(base, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    try:
        yield make_url(base).set(database=name).render_as_string(hide_password=False)
    finally:
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request: pytest.FixtureRequest, tmp_path) -> Iterator[str]:  # noqa: ANN001
    """An empty database URL on each backend (PostgreSQL skips with a reason when not configured)."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'recsys.db'}"
        return
    url = request.getfixturevalue("postgres_url")
    from app.db.migrate import downgrade

    downgrade(url, "base")  # every test starts from an empty schema
    yield url
    downgrade(url, "base")
