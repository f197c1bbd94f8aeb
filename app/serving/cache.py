"""The on-disk cache a host's workers share: serving indexes and top lists, built once per entry.

An entry is a few files ``KEY.<suffix>`` under ``RECSYS_DATA_DIR/index-cache``, where the key hashes
everything that determines their content. A worker that needs an entry takes an exclusive lock on
``KEY.lock``: it reads the entry if another worker finished it meanwhile, else builds and writes it while
the others wait on the lock and then read it. Files are replaced (written aside, then renamed), never
rewritten in place: a worker reading a mapped file that shrank under it would die of SIGBUS. After each
write only the ``KEEP`` newest entries stay. Torch-free.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

log = logging.getLogger("recsys.cache")

KEEP = 12  # newest entries kept (a checkpoint has up to 3: its IVF index and two top-list tables)
T = TypeVar("T")


def shared(
    cache_dir: Path | None,
    key: str,
    *,
    read: Callable[[Path], T | None],
    build: Callable[[], T],
    write: Callable[[Path, T], None],
    what: str,
) -> T:
    """The entry ``key``: read, or built and written by one process at a time (the others wait).

    ``read(base)`` and ``write(base, value)`` handle the files ``base.with_suffix(...)`` of
    ``base = cache_dir / key``; ``read`` returns None for a missing or unreadable entry. After a write the
    entry is read back, so every worker holds the same (memory-mapped) copy. Without a usable cache
    directory (None, or read-only) the value is built for this process only.
    """
    if cache_dir is None:
        return build()
    base = cache_dir / key
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
        lock = base.with_suffix(".lock").open("a")
    except OSError as exc:
        log.warning(f"{what} cache unavailable", extra={"path": str(cache_dir), "reason": str(exc)})
        return build()
    with lock:  # closing the file releases the lock
        fcntl.flock(lock, fcntl.LOCK_EX)
        hit = read(base)
        if hit is not None:
            return hit
        value = build()
        try:
            write(base, value)
        except OSError as exc:
            log.warning(f"could not cache the {what}", extra={"path": str(base), "reason": str(exc)})
            return value
        prune(cache_dir)
        stored = read(base)
        return value if stored is None else stored


def replace_file(path: Path, save: Callable[[Path], None]) -> None:
    """Write ``path`` through ``save(tmp)`` to a name of this process, then rename it into place."""
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    try:
        save(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def prune(cache_dir: Path, keep: int = KEEP) -> list[str]:
    """Delete all but the ``keep`` most recently written entries, every file of each; the keys removed.

    Every retrained checkpoint adds entries (80 MB of tables for 100k users), so the directory would only
    grow. Unlinking is safe for a worker still serving an old model: its mapped files stay readable until
    it lets go of them; a restart that needs an entry again rebuilds it.
    """
    newest: dict[str, float] = {}
    try:
        for path in cache_dir.iterdir():
            with contextlib.suppress(FileNotFoundError):  # another worker may be pruning too
                key = path.name.split(".", 1)[0]
                newest[key] = max(newest.get(key, 0.0), path.stat().st_mtime)
        old = sorted(newest, key=newest.__getitem__, reverse=True)[keep:]
        for path in cache_dir.iterdir():
            if path.name.split(".", 1)[0] in old:
                path.unlink(missing_ok=True)
    except OSError as exc:
        log.warning("could not prune the serving cache", extra={"path": str(cache_dir), "reason": str(exc)})
        return []
    if old:
        log.info("pruned the serving cache", extra={"path": str(cache_dir), "removed": len(old)})
    return old
