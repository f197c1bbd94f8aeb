"""Shared fixtures: a fresh SQLite database per test and, when configured, a throwaway PostgreSQL database.

PostgreSQL tests run when RECSYS_TEST_POSTGRES_URL is set (CI sets it) and skip with that reason otherwise.
Each test session gets its own database, so parallel runs never share state.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from pg_support import PG_ENV, OwnPostgres, postgres_base_url, postgres_bin, scratch_database


@pytest.fixture(scope="session")
def postgres_url() -> Iterator[str]:
    """URL of a new, empty PostgreSQL database, dropped at the end of the session."""
    base = postgres_base_url()
    if base is None:
        pytest.skip(f"PostgreSQL tests need {PG_ENV} (e.g. postgresql://postgres@127.0.0.1:5432/test)")
    with scratch_database(base) as url:
        yield url


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


@pytest.fixture
def own_postgres() -> Iterator[OwnPostgres]:
    """A PostgreSQL cluster of the test's own, started; the test may stop and start it (an outage)."""
    bin_dir = postgres_bin()
    if bin_dir is None:
        pytest.skip("needs the PostgreSQL server binaries (initdb, pg_ctl) to run a cluster of its own")
    pg = OwnPostgres(bin_dir)
    try:
        pg.start()
        yield pg
    finally:
        pg.remove()
