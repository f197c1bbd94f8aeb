"""Fixtures for the HTTP service tests: one deployment and server per backend, shared by the session.

PostgreSQL uses the session database of tests/conftest.py (RECSYS_TEST_POSTGRES_URL), reset to an
empty schema (downgrade to base, then upgrade) before the synthetic log is loaded.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from api_support import Deployment, Server, deploy
from pg_support import postgres_base_url, scratch_database

from app.db.migrate import downgrade


@pytest.fixture(scope="session")
def sqlite_deployment(tmp_path_factory: pytest.TempPathFactory) -> Deployment:
    data_dir: Path = tmp_path_factory.mktemp("api-sqlite")
    return deploy(f"sqlite:///{data_dir / 'recsys.db'}", data_dir, trained=True)


@pytest.fixture(scope="session")
def postgres_deployment(postgres_url: str, tmp_path_factory: pytest.TempPathFactory) -> Deployment:
    downgrade(postgres_url, "base")
    return deploy(postgres_url, tmp_path_factory.mktemp("api-postgres"), trained=True)


@pytest.fixture(scope="session", params=["sqlite", "postgres"])
def deployment(request: pytest.FixtureRequest) -> Deployment:
    return request.getfixturevalue(f"{request.param}_deployment")


@pytest.fixture(scope="session")
def server(deployment: Deployment) -> Iterator[Server]:
    """A server per backend: a model trained by the trainer promoted, admin token set, polling off."""
    srv = Server(deployment)
    try:
        srv.wait_ready()
        yield srv
    finally:
        srv.stop()


@pytest.fixture(params=["sqlite", "postgres"])
def fresh_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """An empty database of its own for one test (PostgreSQL: a new database, dropped afterwards)."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'recsys.db'}"
        return
    request.getfixturevalue("postgres_url")  # skips with the reason when PostgreSQL is not configured
    with scratch_database(postgres_base_url(), "recsys_api") as url:
        yield url
