"""Engine creation (SQLite pragmas, PostgreSQL driver) and the schema-version guard."""

from __future__ import annotations

from pathlib import Path

from sqlalchemy import Engine, create_engine, event
from sqlalchemy import exc as sa_exc

from app.settings import Settings, get_settings


def unavailable(exc: BaseException) -> bool:
    """Connection trouble, a server shutting down, a locked or broken database file: not the request's fault
    (the service answers 503 and retries; it recovers when the database does)."""
    if isinstance(exc, sa_exc.DBAPIError) and exc.connection_invalidated:
        return True
    return isinstance(exc, (sa_exc.OperationalError, sa_exc.InterfaceError, sa_exc.TimeoutError, OSError))


WAL_PAGES = 16_000  # the WAL's size, in pages, at which it is copied back into the database file


class SchemaError(RuntimeError):
    """The database schema is not at the revision this code expects."""


def make_engine(url: str | None = None, settings: Settings | None = None, *, autocheckpoint: bool = True) -> Engine:
    """Create an engine; SQLite gets WAL, foreign keys and a busy timeout, and its folder is created.

    ``autocheckpoint=False`` leaves WAL checkpoints to the caller (the service's ``app.db.wal``), so that
    no commit pays for one."""
    settings = settings or get_settings()
    url = url or settings.sqlalchemy_url
    if url.startswith("sqlite"):
        path = url.split("///", 1)[-1]
        if path and path != ":memory:":
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        # the event writer's statements alone come in ~130 sizes (app/db/events.py: statement_sizes): a
        # driver cache of 128 statements would compile some of them again and again
        engine = create_engine(url, connect_args={"timeout": 30, "cached_statements": 512})

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_conn, _record):  # type: ignore[no-untyped-def]
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.execute("PRAGMA synchronous=FULL")
            cur.execute("PRAGMA busy_timeout=30000")
            # Copy the WAL back every 16000 pages (64 MiB) instead of 1000: an index page dirtied by many
            # commits (random keys: users, UUIDv4 event ids) is then written back once, not once per commit.
            cur.execute(f"PRAGMA wal_autocheckpoint={WAL_PAGES if autocheckpoint else 0}")
            cur.close()

        return engine
    return create_engine(url, pool_pre_ping=True)
