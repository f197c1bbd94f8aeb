"""The protocol's metrics, vectorised, and the most-popular baseline (numpy; torch only for top-k).

Full ranking over the candidate items (those with a train positive), excluding the user's own train
items. Recall@K = hits/min(K, |test|); NDCG@K with binary gains and the ideal over min(K, |test|);
HitRate@K; catalogue coverage@10 (share of candidates appearing in someone's top 10). Mean over users
with at least one held-out item.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import Any

import numpy as np
from scipy import sparse
from threadpoolctl import ThreadpoolController

from trainer.samplers import PairIndex

KS = (10, 20)
# one block of scores (users × items, float32) at most this large: 1024 users a block up to 65k items, 67
# at 1M (a 1024-user block of a 1M-item catalogue was 4 GiB, and the most-popular baseline kept another)
BLOCK_BYTES = 256 * 2**20
# a held-out report scores users × items cells: past this many, a fixed random sample of the users (at
# least REPORT_MIN_USERS) is scored instead of all of them. The benchmark sets stay whole (gowalla: 30k
# users × 37k items = 1.1e9); a 100k-user × 1M-item log's report took ~2 of its 6 minutes of training
REPORT_CELLS = 2_000_000_000
REPORT_MIN_USERS = 5000
# user rows -> (len, n_items) scores, in an array evaluate may write into (valid until the next call)
ScoreFn = Callable[[np.ndarray], np.ndarray]


@functools.cache
def _blas() -> ThreadpoolController:
    return ThreadpoolController()  # finds the BLAS numpy loaded (once: it inspects the loaded libraries)


def blas_threads(n: int) -> AbstractContextManager[Any]:
    """numpy's matrix products on at most ``n`` threads inside the ``with`` block (by default its BLAS
    takes every core, also those another process of the same run is training on)."""
    return _blas().limit(limits=n, user_api="blas")


def _reused_rows(n_cols: int, dtype: Any) -> Callable[[int], np.ndarray]:
    """A (rows, n_cols) array handed out again on every call (grown when needed): a new (1024, 37k) array
    per batch is 150 MB of fresh pages to fault in and zero, which took validation's products 1.2-2.4x as
    long (gowalla, one thread)."""
    buf = np.empty((0, n_cols), dtype=dtype)

    def rows(n: int) -> np.ndarray:
        nonlocal buf
        if buf.shape[0] < n:
            buf = np.empty((n, n_cols), dtype=dtype)
        return buf[:n]

    return rows


def block_rows(n_items: int, most: int = 1024) -> int:
    """Users per block of scores: ``most``, fewer when their rows would pass ``BLOCK_BYTES``."""
    return max(1, min(most, BLOCK_BYTES // (4 * max(n_items, 1))))


def report_users(n_users: int, n_items: int) -> int | None:
    """How many users a held-out report scores: None (all) while users × items stays within
    ``REPORT_CELLS``, else as many as fit in it, at least ``REPORT_MIN_USERS``."""
    if n_users * n_items <= REPORT_CELLS:
        return None
    return max(REPORT_MIN_USERS, REPORT_CELLS // max(n_items, 1))


def dot_scores(user_vectors: np.ndarray, item_vectors: np.ndarray) -> ScoreFn:
    """Inner products, written into one buffer for every call."""
    out = _reused_rows(item_vectors.shape[0], np.result_type(user_vectors, item_vectors))
    return lambda rows: np.matmul(user_vectors[rows], item_vectors.T, out=out(len(rows)))


def popularity_scores(popularity: np.ndarray) -> ScoreFn:
    """Every user's row is the items' popularity, written into one buffer for every call. It carries
    ``order``, the one ranking every user shares (ties by item row), which ``evaluate`` walks instead."""
    pop = np.asarray(popularity, dtype=np.float32)
    out = _reused_rows(pop.size, np.float32)

    def scores(rows: np.ndarray) -> np.ndarray:
        block = out(len(rows))
        block[:] = pop
        return block

    scores.order = np.argsort(-pop, kind="stable")  # type: ignore[attr-defined]
    return scores


def _first_allowed(order: np.ndarray, excluded: sparse.csr_matrix, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Each row's first k items of the shared ranking ``order`` that it does not exclude (padded with
    item 0, marked False in the second array, when fewer are left): the top k of a full ranking, from
    the head of ``order`` only (k plus the most items a row excludes)."""
    head = order[:k + int(np.diff(excluded.indptr).max(initial=0))]
    keep = ~(excluded[:, head].toarray() > 0)
    rank = np.cumsum(keep, axis=1)
    r, c = np.nonzero(keep & (rank <= k))
    top = np.zeros((excluded.shape[0], k), dtype=np.int64)
    found = np.zeros((excluded.shape[0], k), dtype=bool)
    top[r, rank[r, c] - 1], found[r, rank[r, c] - 1] = head[c], True
    return top, found


def top_k(scores: np.ndarray, k: int, block: int = 64) -> np.ndarray:
    """Column indices of each row's k best scores, best first.

    torch's topk, on the same memory (numpy's argpartition took 0.9 s for 1024 users × 37k items against
    0.08 s, and validation runs every epoch), over candidates only: the k best scores lie in the k blocks
    of ``block`` columns with the highest maxima (or in the columns after the last whole block), and one
    pass of block maxima costs half of a topk over every column (1024 × 37k: 21 against 43 ms)."""
    import torch

    n, m = scores.shape
    k = min(k, m)
    t = torch.from_numpy(np.ascontiguousarray(scores))
    blocks = m // block
    if blocks < 2 * k:  # too few blocks to leave any out
        return t.topk(k, dim=1, sorted=True).indices.numpy()
    best = t[:, :blocks * block].unflatten(1, (blocks, block)).amax(2).topk(k, dim=1).indices
    cols = torch.cat([(best[:, :, None] * block + torch.arange(block)).reshape(n, -1),
                      torch.arange(blocks * block, m).expand(n, -1)], dim=1)
    pick = torch.gather(t, 1, cols).topk(k, dim=1, sorted=True).indices
    return torch.gather(cols, 1, pick).numpy()


def _ranked(scores: np.ndarray, rows: np.ndarray, exclude: sparse.csr_matrix, blocked: np.ndarray,
            k: int) -> tuple[np.ndarray, np.ndarray]:
    """Each row's top k of a full ranking without its excluded and blocked items, and which of them are
    rankable at all (a row with fewer than k such items)."""
    scores = np.require(scores, np.float32, ["C_CONTIGUOUS", "WRITEABLE"])  # copies only if it must
    scores[:, blocked] = -np.inf
    ex = exclude[rows].tocoo()
    scores[ex.row, ex.col] = -np.inf
    top = top_k(scores, k)
    return top, np.isfinite(np.take_along_axis(scores, top, axis=1))


def evaluate(
    score_fn: ScoreFn, exclude: sparse.csr_matrix, held_u: np.ndarray, held_i: np.ndarray,
    candidates: np.ndarray, *, ks: tuple[int, ...] = KS, batch: int = 1024, max_users: int | None = None,
    seed: int = 0,
) -> dict[str, float]:
    """Metrics of a scorer on held-out (user, item) pairs; ``max_users`` evaluates a fixed random subset."""
    n_users, n_items = exclude.shape
    held = sparse.csr_matrix((np.ones(held_u.size, dtype=np.float32), (held_u, held_i)), shape=(n_users, n_items))
    held.sum_duplicates()
    pairs = PairIndex(held)
    users = np.flatnonzero(np.diff(held.indptr))
    if max_users is not None and users.size > max_users:
        users = np.sort(np.random.default_rng(seed).choice(users, max_users, replace=False))
    kmax = max(ks)
    batch = block_rows(n_items, batch)
    sums = {f"{m}@{k}": 0.0 for k in ks for m in ("recall", "ndcg", "hitrate")}
    discounts = 1.0 / np.log2(np.arange(2, kmax + 2))
    ideal = np.cumsum(discounts)
    covered = np.zeros(n_items, dtype=bool)
    blocked = ~np.asarray(candidates, dtype=bool)
    order = getattr(score_fn, "order", None)  # one ranking shared by every user (most-popular)
    if order is not None:
        order = order[~blocked[order]]
    for start in range(0, users.size, batch):
        rows = users[start:start + batch]
        if order is not None:
            top, finite = _first_allowed(order, exclude[rows], kmax)
        else:
            top, finite = _ranked(score_fn(rows), rows, exclude, blocked, kmax)
        truth = held[rows]
        n_true = np.diff(truth.indptr)
        hits = pairs.contains(rows[:, None], top) & finite
        covered[top[:, :10][finite[:, :10]]] = True
        for k in ks:
            h = hits[:, :k]
            k_eff = h.shape[1]
            denom = np.minimum(k, n_true)
            n_hits = h.sum(1)
            sums[f"recall@{k}"] += float((n_hits / denom).sum())
            sums[f"hitrate@{k}"] += float((n_hits > 0).sum())
            sums[f"ndcg@{k}"] += float(((h * discounts[:k_eff]).sum(1) / ideal[denom - 1]).sum())
    out = {name: (v / users.size if users.size else 0.0) for name, v in sums.items()}
    out["coverage@10"] = float(covered[~blocked].mean()) if (~blocked).any() else 0.0
    out["users"] = int(users.size)
    return out
