"""The compiled loops of a training step (numba): Adam's update of the touched rows, the pooled
history's row sums and the (user, item) membership test of the false-negative guards. Each replaced
numpy, torch or scipy calls that made a large share of a step (trainer/optim.py, trainer/model.py and
``in_rows`` say which and by how much). The first two run threads over rows, so every row's result is
the same whatever the thread count; the membership test is one thread (a batch's lookups take ~0.6 ms).

No ``fastmath``: with it, the kernels a process compiled itself and the ones a process loaded from
numba's cache gave results apart in the last bits on one CPU (AMD EPYC, AVX2: Adam's sqrt and division),
so the final fit's process (trainer/lockstep.py) no longer trained the weights of a one-thread fit here
(tests/trainer/test_lockstep.py, from a cold cache); without it, a ml-latest-small step took as long.

Threads come from numba's own "workqueue" pool, not its OpenMP one: beside torch's OpenMP runtime a
two-process training run crashed once in ~30 with the OpenMP pool (a segfault mid-training; scanpy
saw the same with torch, scverse/scanpy#4026), none with workqueue; OpenMP was ~15% faster on these
loops. ``NUMBA_THREADING_LAYER`` set in the environment still decides. On one thread, neither pool is
started (``RowKernel``).
"""

from __future__ import annotations

import math
import os
import types
from collections.abc import Callable
from typing import Any

import numba
import numpy as np

if "NUMBA_THREADING_LAYER" not in os.environ:
    numba.config.THREADING_LAYER = "workqueue"


class RowKernel:
    """A loop over rows compiled twice: threads over rows, and plain (``prange`` runs as ``range``).

    With ``threads`` 1 (each fit of a two-core run trains on one) the plain one runs, the same arithmetic
    row by row (bit for bit: tests/trainer/test_kernels.py). The threaded one still hands its loop to
    numba's pool on one thread: in a gowalla fit, 2.2-2.4 ms a step for the two pooled-history row sums
    and 3.7-4.2 ms for Adam, against 1.4-1.7 and 3.1 ms plain (−6% a step). Plain, numba's "numpy" error
    model: its default "python" model checks Adam's divisor for zero, which kept LLVM from vectorising the
    loop (3x slower); the divisor is ``sqrt(v) + eps``, never zero."""

    def __init__(self, fn: Callable[..., Any]) -> None:
        plain = types.FunctionType(fn.__code__, fn.__globals__, fn.__name__ + "_plain")
        plain.__qualname__ = fn.__qualname__ + "_plain"  # its own entry in numba's cache
        self.threaded = numba.njit(parallel=True, cache=True)(fn)
        self.plain = numba.njit(cache=True, error_model="numpy")(plain)
        self.__doc__ = fn.__doc__

    def __call__(self, threads: int, *args: Any) -> Any:
        if threads <= 1:
            return self.plain(*args)
        numba.set_num_threads(min(threads, numba.config.NUMBA_NUM_THREADS))
        return self.threaded(*args)


@RowKernel
def adam_rows(weight: np.ndarray, exp_avg: np.ndarray, exp_avg_sq: np.ndarray, rows: np.ndarray,
              starts: np.ndarray, order: np.ndarray, values: np.ndarray, b1: float, b2: float,
              step_size: float, eps: float) -> None:  # pragma: no cover - compiled
    """Row ``rows[k]``'s gradient is the sum of ``values[order[starts[k]:starts[k + 1]]]``; Adam on it."""
    for k in numba.prange(rows.size):
        r, s0, s1 = rows[k], starts[k], starts[k + 1]
        first = order[s0]
        for j in range(weight.shape[1]):
            g = values[first, j]
            for t in range(s0 + 1, s1):
                g += values[order[t], j]
            m = b1 * exp_avg[r, j] + (1 - b1) * g
            v = b2 * exp_avg_sq[r, j] + (1 - b2) * g * g
            exp_avg[r, j] = m
            exp_avg_sq[r, j] = v
            weight[r, j] -= step_size * m / (math.sqrt(v) + eps)


@RowKernel
def sum_rows(indptr: np.ndarray, cols: np.ndarray, vectors: np.ndarray) -> np.ndarray:  # pragma: no cover
    """Row b of the result is the sum of ``vectors[cols[indptr[b]:indptr[b + 1]]]``: a CSR matrix of ones
    times ``vectors``, threads over rows (scipy's product is one thread and multiplies by the ones)."""
    out = np.zeros((indptr.size - 1, vectors.shape[1]), dtype=vectors.dtype)
    for b in numba.prange(indptr.size - 1):
        for k in range(indptr[b], indptr[b + 1]):
            c = cols[k]
            for j in range(vectors.shape[1]):
                out[b, j] += vectors[c, j]
    return out


@numba.njit(cache=True)
def in_rows(indptr: np.ndarray, indices: np.ndarray, users: np.ndarray, items: np.ndarray,
            out: np.ndarray) -> None:  # pragma: no cover - compiled
    """``out[k]``: is ``items[k]`` in row ``users[k]`` of a CSR matrix with sorted indices? A binary
    search within the user's row (tens of items) instead of over every pair of the matrix: half the
    time of ``np.searchsorted`` over the 2.5M keys of a 5M-event log (0.6 against 1.2 ms for a mined
    batch of 256 × 100), which made 5% of a hard-negative step."""
    for k in range(users.size):
        lo, hi, x = indptr[users[k]], indptr[users[k] + 1], items[k]
        end = hi
        while lo < hi:
            mid = (lo + hi) // 2
            if indices[mid] < x:
                lo = mid + 1
            else:
                hi = mid
        out[k] = lo < end and indices[lo] == x
