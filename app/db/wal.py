"""SQLite WAL checkpoints taken by a background thread, not inside an acknowledged commit.

SQLite's own autocheckpoint runs in whichever commit crosses the threshold, and in the service that
commit holds the write lock every worker's writers queue on: on a 2.3M-event database at ~700 group
commits a second, each such checkpoint stalled every in-flight event for 50–70 ms, three times in 8 s,
which alone set the p99 of single-event POSTs (docs/benchmarks.md). Here a thread copies the WAL back
every ``interval`` seconds with a PASSIVE checkpoint, which runs beside the writers instead of in front
of them. PASSIVE never finishes while commits keep arriving, so once the WAL holds ``restart_pages``
frames one more PASSIVE pass runs under the write lock: it copies back only what came in since the
previous pass, and the next commit then starts the WAL file over instead of growing it. RESTART and FULL
would wait for readers (a retraining run's long read) while holding that lock; PASSIVE never waits.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import Any

from sqlalchemy import Engine

from app.db.engine import WAL_PAGES

log = logging.getLogger("recsys.db.wal")

Observer = Callable[[str, float, int], None]  # (pass: "background" | "under_lock", seconds, WAL frames)


class WalCheckpointer:
    """One thread per service process; pair it with an engine made with ``autocheckpoint=False``."""

    def __init__(
        self,
        engine: Engine,
        write_lock: AbstractContextManager[Any],
        *,
        interval: float = 0.5,
        restart_pages: int = WAL_PAGES,
        observe: Observer | None = None,
    ) -> None:
        self._engine = engine
        self._database = engine.url.database or ":memory:"
        self._write_lock = write_lock
        self._interval = interval
        self._restart_pages = restart_pages
        self._observe = observe or (lambda _pass, _seconds, _frames: None)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="wal-checkpointer", daemon=True)
        self._thread.start()

    def close(self, timeout: float = 10.0) -> None:
        """Stop the thread after one last pass (the next process to open the database finds a short WAL)."""
        if self._thread is None:
            return
        self._stop.set()
        self._thread.join(timeout)
        self._thread = None

    def step(self) -> int:
        """One pass: copy back what it can beside the writers, then, if the WAL has grown past
        ``restart_pages``, the rest under the write lock. Returns the WAL's frames after the pass."""
        frames = self._passive("background")
        if frames >= self._restart_pages:
            with self._write_lock:
                frames = self._passive("under_lock")
        return frames

    def _passive(self, kind: str) -> int:
        """A PASSIVE checkpoint; in the background, also the fsync of the database file that SQLite leaves
        to the pass that reaches the WAL's end. Without it that pass, the one under the lock, synced every
        page copied since the last such pass: 30-100 ms instead of 1-5 (strace, 2.3M-event database)."""
        start = time.perf_counter()
        with self._engine.connect() as conn:
            _busy, frames, copied = conn.exec_driver_sql("PRAGMA wal_checkpoint(PASSIVE)").one()
            if kind == "background" and copied > 0:
                _sync_file_sqlite_holds(self._database)  # ``conn`` keeps one of SQLite's descriptors open
        self._observe(kind, time.perf_counter() - start, max(frames, 0))
        return int(frames)

    def _run(self) -> None:
        failing = False
        while True:
            stopping = self._stop.wait(self._interval)
            try:
                self.step()
            except Exception as exc:  # a locked or vanished database: try again at the next interval
                if not failing:  # once per outage, not twice a second
                    log.warning("WAL checkpoints fail; retrying every %.1f s: %s", self._interval, exc)
                failing = True
            else:
                if failing:
                    log.warning("WAL checkpoints succeed again")
                failing = False
            if stopping:
                return


def _sync_file_sqlite_holds(database: str) -> None:
    """``fdatasync`` the database file through a descriptor SQLite holds, found in /proc/self/fd (Linux;
    elsewhere nothing is synced here and the pass under the lock does it all). Never through one of our
    own: closing any descriptor of a file drops every POSIX lock the process holds on it, SQLite's too,
    and another process's connection could then take itself for the last one and delete the WAL under
    the service (tests/test_wal.py). A descriptor closed and reused meanwhile syncs some other file,
    which is harmless."""
    target = os.path.realpath(database)
    try:
        names = os.listdir("/proc/self/fd")
    except OSError:
        return
    for name in names:
        try:
            if os.readlink(f"/proc/self/fd/{name}") == target:
                os.fdatasync(int(name))
                return
        except OSError:
            continue
