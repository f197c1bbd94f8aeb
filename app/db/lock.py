"""A cross-process job lock, so that two retraining runs never overlap.

PostgreSQL: a session-level advisory lock on a dedicated connection. SQLite: an exclusive
``flock`` on a file beside the database. Both die with the process that holds them, so a
crashed run never leaves a stale lock behind.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from sqlalchemy import Engine, text


class LockHeld(RuntimeError):
    """Another process holds the lock."""


def _pg_key(name: str) -> int:
    return int.from_bytes(hashlib.blake2b(name.encode(), digest_size=8).digest(), "big", signed=True)


@contextmanager
def job_lock(engine: Engine, name: str = "retrain") -> Iterator[None]:
    """Hold the named lock for the duration of the block, or raise LockHeld at once."""
    if engine.dialect.name == "postgresql":
        key = _pg_key(name)
        with engine.connect() as conn:
            if not conn.execute(text("SELECT pg_try_advisory_lock(:k)"), {"k": key}).scalar_one():
                raise LockHeld(f"another `{name}` run holds the PostgreSQL advisory lock {key}")
            conn.commit()
            try:
                yield
            finally:
                conn.execute(text("SELECT pg_advisory_unlock(:k)"), {"k": key})
                conn.commit()
        return
    database = engine.url.database
    if not database or database == ":memory:":
        raise ValueError("job_lock needs a file-backed SQLite database")
    path = Path(f"{database}.{name}.lock")
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown"
            raise LockHeld(f"another `{name}` run (pid {holder}) holds the lock file {path}") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        yield
    finally:
        os.close(fd)  # closing releases the flock


class SqliteWriteLock:
    """Serialises SQLite writers across threads *and* worker processes, in arrival order.

    SQLite allows one writer; without this, concurrent writers from several uvicorn workers wait in
    SQLite's busy handler, whose growing sleeps turn a 2 ms commit into seconds under load.
    """

    def __init__(self, database: str) -> None:
        self._thread_lock = threading.Lock()
        self._path = f"{database}.write.lock"
        self._fd: int | None = None

    def __enter__(self) -> None:
        self._thread_lock.acquire()
        try:
            if self._fd is None:
                self._fd = os.open(self._path, os.O_RDWR | os.O_CREAT, 0o644)
            fcntl.flock(self._fd, fcntl.LOCK_EX)
        except BaseException:
            self._thread_lock.release()
            raise

    def __exit__(self, *exc: object) -> None:
        try:
            if self._fd is not None:
                fcntl.flock(self._fd, fcntl.LOCK_UN)
        finally:
            self._thread_lock.release()
