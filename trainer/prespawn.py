"""The final fit's process, started before the command that needs it has imported torch or read its data.

A spawned process spends ~2.5 s importing torch and the trainer before it can train, and
``Process.start`` waits until it has read its arguments, so the side-by-side final fit
(trainer/lockstep.py) used to hold selection up by about that long. Started first, it imports beside the
command's own imports and data loading on the other core, then waits for its job on a pipe: both fits
of `recsys train` begin ~1.3 s sooner (ml-100k's whole run 15.0-15.8 s against 17.5-19.6 s back to back;
docs/benchmarks.md).

This module imports no torch itself, so that `start` can run first. A process nobody claims is stopped by
``discard`` (and, a daemon, at exit).
"""

from __future__ import annotations

import contextlib
import multiprocessing as mp
from collections.abc import Iterator
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess

_waiting: tuple[BaseProcess, Connection] | None = None


def side_by_side(threads: int, world: int, device: str) -> bool:
    """Whether a run's final fit goes to a second process: threads to split between the fits, one
    process (not torchrun's ranks), on the CPU."""
    return threads >= 2 and world == 1 and device == "cpu"


@contextlib.contextmanager
def early(threads: int, world: int, device: str, *, final_fit: bool = True) -> Iterator[None]:
    """Around a command that trains: the final fit's process starts at once when the run will want one
    (it has a final fit, run ``side_by_side``), so it imports beside the command's own imports and
    reading; a process the run did not take (it failed first, or had nothing to train) is stopped on the
    way out."""
    if final_fit and side_by_side(threads, world, device):
        start()
    try:
        yield
    finally:
        discard()


def start() -> None:
    """Start the final fit's process, unless one is waiting already."""
    global _waiting
    if _waiting is not None:
        return
    ctx = mp.get_context("spawn")  # a fork would copy the parent's OpenMP and numba threads' state
    conn, child = ctx.Pipe()
    proc = ctx.Process(target=_serve, args=(child,), name="recsys-final-fit", daemon=True)
    proc.start()
    child.close()
    _waiting = (proc, conn)


def claim() -> tuple[BaseProcess, Connection] | None:
    """The waiting process and its end of the pipe (send it the final fit's arguments), once; or None."""
    global _waiting
    waiting, _waiting = _waiting, None
    return waiting


def discard() -> None:
    """Stop a process nobody claimed."""
    waiting = claim()
    if waiting is not None:
        proc, conn = waiting
        conn.close()
        proc.terminate()  # it holds nothing yet: importing, or waiting for a job
        proc.join()


def _serve(conn: Connection) -> None:
    """The child: import, then run the final fit it is sent (nothing if the parent closes the pipe)."""
    from trainer.lockstep import final_worker

    try:
        args = conn.recv()
    except (EOFError, OSError):
        return
    final_worker(conn, *args)
