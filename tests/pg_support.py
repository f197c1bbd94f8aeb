"""Throwaway PostgreSQL databases for tests: created empty, dropped afterwards, so runs never share state."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager

from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url

PG_ENV = "RECSYS_TEST_POSTGRES_URL"


def postgres_base_url() -> str | None:
    """The configured server URL with the psycopg 3 driver pinned, or None when PostgreSQL tests are off."""
    url = os.environ.get(PG_ENV)
    if not url:
        return None
    for prefix in ("postgresql://", "postgres://"):
        if url.startswith(prefix):
            url = "postgresql+psycopg://" + url[len(prefix) :]
    return url


@contextmanager
def scratch_database(base: str, prefix: str = "recsys_test") -> Iterator[str]:
    """URL of a new, empty database on the server of ``base``; dropped (connections and all) on exit."""
    name = f"{prefix}_{uuid.uuid4().hex[:10]}"
    admin = create_engine(base, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    try:
        yield make_url(base).set(database=name).render_as_string(hide_password=False)
    finally:
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()
