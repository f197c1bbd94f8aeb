"""Fixtures for the HTTP service tests: one shared SQLite deployment and server, fresh ones on demand."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from api_support import Deployment, Server, deploy


@pytest.fixture(scope="session")
def sqlite_deployment(tmp_path_factory: pytest.TempPathFactory) -> Deployment:
    data_dir: Path = tmp_path_factory.mktemp("api-sqlite")
    return deploy(f"sqlite:///{data_dir / 'recsys.db'}", data_dir)


@pytest.fixture(scope="session")
def server(sqlite_deployment: Deployment) -> Iterator[Server]:
    """The shared server: SQLite, the cluster checkpoint promoted, admin token set."""
    srv = Server(sqlite_deployment)
    try:
        srv.wait_ready()
        yield srv
    finally:
        srv.stop()
