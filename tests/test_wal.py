"""The service's WAL checkpointer: commits never checkpoint, a thread does, and the WAL stays bounded."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from sqlalchemy import Engine, text

from app.db.engine import WAL_PAGES, make_engine
from app.db.lock import SqliteWriteLock
from app.db.wal import WalCheckpointer


def _engine(path: Path, autocheckpoint: bool) -> Engine:
    engine = make_engine(f"sqlite:///{path}", autocheckpoint=autocheckpoint)
    with engine.begin() as conn:
        conn.execute(text("CREATE TABLE IF NOT EXISTS t (k INTEGER PRIMARY KEY, v TEXT)"))
    return engine


def _write(engine: Engine, lock: SqliteWriteLock, start: int, commits: int, pause: float = 0.0) -> None:
    """One commit per row, each under the write lock as the service's writers take it; ``pause`` between
    commits stands for the service's writer answering the requests of the last group."""
    for k in range(start, start + commits):
        with lock, engine.begin() as conn:
            conn.execute(text("INSERT INTO t VALUES (:k, :v)"), {"k": k, "v": "x" * 2000})
        time.sleep(pause)


def _wal_frames(engine: Engine) -> int:
    with engine.connect() as conn:
        return conn.exec_driver_sql("PRAGMA wal_checkpoint(PASSIVE)").one()[1]


def test_the_service_engine_leaves_checkpoints_to_the_caller(tmp_path: Path) -> None:
    for autocheckpoint, expected in ((True, WAL_PAGES), (False, 0)):
        engine = _engine(tmp_path / f"{autocheckpoint}.db", autocheckpoint)
        with engine.connect() as conn:
            assert conn.exec_driver_sql("PRAGMA wal_autocheckpoint").scalar_one() == expected
        engine.dispose()


def test_a_pass_past_the_bound_lets_the_next_commit_restart_the_wal(tmp_path: Path) -> None:
    path = tmp_path / "db.sqlite"
    engine, lock = _engine(path, autocheckpoint=False), SqliteWriteLock(str(path))
    _write(engine, lock, 0, 300)
    seen: list[tuple[str, int]] = []
    checkpointer = WalCheckpointer(
        engine, lock, restart_pages=100, observe=lambda kind, _s, frames: seen.append((kind, frames))
    )
    frames = checkpointer.step()
    assert frames >= 300  # every commit appended at least a page; none was copied back by a commit
    assert [kind for kind, _ in seen] == ["background", "under_lock"]
    _write(engine, lock, 300, 1)  # the WAL was copied back in full: this commit starts it over
    assert _wal_frames(engine) < 10
    with engine.connect() as conn:
        assert conn.execute(text("SELECT count(*) FROM t")).scalar_one() == 301
    engine.dispose()


def test_below_the_bound_no_pass_takes_the_write_lock(tmp_path: Path) -> None:
    path = tmp_path / "db.sqlite"
    engine, lock = _engine(path, autocheckpoint=False), SqliteWriteLock(str(path))
    _write(engine, lock, 0, 20)
    seen: list[str] = []
    WalCheckpointer(engine, lock, restart_pages=10_000, observe=lambda kind, *_: seen.append(kind)).step()
    assert seen == ["background"]
    engine.dispose()


def test_the_thread_keeps_the_wal_bounded_under_writes(tmp_path: Path) -> None:
    path = tmp_path / "db.sqlite"
    engine, lock = _engine(path, autocheckpoint=False), SqliteWriteLock(str(path))
    checkpointer = WalCheckpointer(engine, lock, interval=0.01, restart_pages=50)
    checkpointer.start()
    try:
        _write(engine, lock, 0, 1000, pause=0.001)
    finally:
        checkpointer.close()
    _write(engine, lock, 1000, 1)
    wal_bytes = Path(f"{path}-wal").stat().st_size  # its high-water mark: a restart reuses the file
    table_bytes = 1001 * 2000
    assert wal_bytes < table_bytes / 3  # without the thread the WAL holds every page ever written
    with engine.connect() as conn:
        assert conn.execute(text("SELECT count(*) FROM t")).scalar_one() == 1001
    engine.dispose()


WRITER = """
import sys
from pathlib import Path
sys.path[:0] = [sys.argv[2], sys.argv[3]]
from test_wal import _engine, _write
from app.db.lock import SqliteWriteLock
from app.db.wal import WalCheckpointer
path = Path(sys.argv[1])
engine, lock = _engine(path, autocheckpoint=False), SqliteWriteLock(str(path))
with engine.connect() as held:  # a connection the service keeps open
    _write(engine, lock, 0, 50)
    WalCheckpointer(engine, lock, restart_pages=10_000).step()  # copies back, then syncs the file
    print("synced", flush=True)
    sys.stdin.readline()
    _write(engine, lock, 50, 50)
    print("written", flush=True)
"""


def test_the_database_file_sync_keeps_every_lock_sqlite_holds(tmp_path: Path) -> None:
    """Closing any descriptor of a file drops every POSIX lock the process holds on it, SQLite's too. A
    sync through a descriptor of its own let another process's close take itself for the database's last
    connection, checkpoint and delete the WAL under the service, whose next commits were lost."""
    path = tmp_path / "db.sqlite"
    root = Path(__file__).resolve().parent
    writer = subprocess.Popen(
        [sys.executable, "-c", WRITER, str(path), str(root), str(root.parent)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )
    try:
        assert writer.stdout is not None and writer.stdin is not None
        assert writer.stdout.readline().strip() == "synced"
        other = make_engine(f"sqlite:///{path}")  # e.g. a CLI command reading the database
        with other.connect() as conn:
            assert conn.execute(text("SELECT count(*) FROM t")).scalar_one() == 50
        other.dispose()  # must not find itself the last connection
        writer.stdin.write("go\n")
        writer.stdin.flush()
        assert writer.stdout.readline().strip() == "written"
        reader = make_engine(f"sqlite:///{path}")
        with reader.connect() as conn:
            assert conn.execute(text("SELECT count(*) FROM t")).scalar_one() == 100
        reader.dispose()
    finally:
        writer.kill()
        writer.wait()


def test_a_background_pass_syncs_the_database_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """What keeps the pass under the lock short: the background pass flushes the pages it copied."""
    path = tmp_path / "db.sqlite"
    engine, lock = _engine(path, autocheckpoint=False), SqliteWriteLock(str(path))
    _write(engine, lock, 0, 20)
    synced: list[str] = []
    real = os.fdatasync

    def fdatasync(fd: int) -> None:
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        real(fd)

    monkeypatch.setattr(os, "fdatasync", fdatasync)
    WalCheckpointer(engine, lock).step()
    assert synced == [os.path.realpath(path)]
    engine.dispose()


def test_a_failing_database_is_logged_once_and_checkpoints_resume(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A database the thread cannot checkpoint (here: its file replaced by a directory) is said once, and
    the thread goes on, so it resumes by itself when the database is back."""
    path = tmp_path / "db.sqlite"
    engine, lock = _engine(path, autocheckpoint=False), SqliteWriteLock(str(path))
    engine.dispose()
    path.rename(tmp_path / "aside.sqlite")
    path.mkdir()
    checkpointer = WalCheckpointer(engine, lock, interval=0.01)
    with caplog.at_level("WARNING", logger="recsys.db.wal"):
        checkpointer.start()
        time.sleep(0.3)
        path.rmdir()
        (tmp_path / "aside.sqlite").rename(path)
        time.sleep(0.3)
        checkpointer.close()
    messages = [r.getMessage() for r in caplog.records]
    assert sum("fail" in m for m in messages) == 1, messages
    assert messages[-1] == "WAL checkpoints succeed again"
    engine.dispose()
