"""Every model user's top-N items (and every item's most similar ones), searched once per checkpoint.

A model is fixed between swaps, and so is each user's ranking: searching FAISS on every request repeats
the same work. After load, a background thread searches all users at once (batched, with the index the
request path would use, the checkpoint's seen items and explicit negatives already left out) and keeps
the best ``n`` rows and scores per user. A recommendation for a model user is then a walk down that list,
skipping items touched since training and hidden items; when fewer than ``k`` survive (or k > n) the
request searches as before. Measured in bench/serve.py: the search was the largest part of a
recommendation's server CPU. Similar items get the same treatment: each item's list leaves out the item
itself, and hidden items are skipped per request.

The table is cached under ``RECSYS_DATA_DIR/index-cache`` (app.serving.cache) by a key of the checkpoint's
file checksums and the serving index's settings, and memory-mapped, so all workers share one copy in the
page cache and a restart does not search again. Torch-free.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import faiss
import numpy as np
from scipy import sparse

from app.serving import cache

log = logging.getLogger("recsys.toplists")

FORMAT = 1
DEFAULT_N = 100  # items kept per user: k up to this is answered from the list
MAX_RESULTS = 4_000_000  # (queries × fetched hits) per FAISS call: bounds the build's memory to ~50 MB
MAX_EXCLUDED = 20_000  # users with more checkpoint exclusions than this are left to the search path


@dataclass(frozen=True)
class TopLists:
    """Row ``u``: user row u's best item rows (-1 padded) and their scores, best first."""

    rows: np.ndarray  # (n_users, n) int32
    scores: np.ndarray  # (n_users, n) float32

    @property
    def n(self) -> int:
        return int(self.rows.shape[1])


def cache_key(ckpt: Any, n: int, index_settings: dict[str, Any], kind: str) -> str:
    """Same checkpoint files, same index settings, kind (users or items) and length → the same table."""
    files = ckpt.manifest.get("files", {})
    digest = json.dumps([files, index_settings, n, kind, FORMAT], sort_keys=True, default=str)
    return hashlib.sha256(digest.encode()).hexdigest()[:24]


def build(queries: np.ndarray, excluded: sparse.csr_matrix, index: Any, n: int) -> TopLists:
    """Search every query (a user's or an item's vector) with ``index`` and keep its best ``n`` rows not in
    its row of ``excluded`` (query × item).

    Queries are searched in order of how many items they exclude, so each batch fetches only as many
    extra hits as its own heaviest user needs.
    """
    n_users, n_items = excluded.shape
    counts = np.diff(excluded.indptr)
    out_rows = np.full((n_users, n), -1, dtype=np.int32)
    out_scores = np.zeros((n_users, n), dtype=np.float32)
    order = np.argsort(counts, kind="stable")
    order = order[counts[order] <= MAX_EXCLUDED]
    pos = 0
    while pos < len(order):
        size = max(1, MAX_RESULTS // (n + int(counts[order[pos]])))
        while True:  # counts grow along ``order``: the batch's last user is its heaviest
            fetch = min(n_items, n + int(counts[order[min(pos + size, len(order)) - 1]]))
            if size * fetch <= MAX_RESULTS or size == 1:
                break
            size = max(1, MAX_RESULTS // fetch)
        users = order[pos : pos + size]
        pos += len(users)
        query = np.ascontiguousarray(queries[users], dtype=np.float32)
        scores, rows = index.search(query, fetch)
        valid = rows >= 0
        # drop each user's own exclusions: (user, item) pairs as one int64 key, matched by sorting
        sub = excluded[users].tocoo()
        banned = sub.row.astype(np.int64) * n_items + sub.col
        keys = np.arange(len(users), dtype=np.int64)[:, None] * n_items + np.clip(rows, 0, None)
        valid &= ~np.isin(keys, banned)
        rank = np.cumsum(valid, axis=1)  # 1-based place among the user's valid hits
        r, c = np.nonzero(valid & (rank <= n))
        slot = rank[r, c] - 1
        out_rows[users[r], slot] = rows[r, c]
        out_scores[users[r], slot] = scores[r, c]
    return TopLists(out_rows, out_scores)


def _paths(base: Path) -> tuple[Path, Path]:
    return base.with_suffix(".top-rows.npy"), base.with_suffix(".top-scores.npy")


def _read(base: Path, n_users: int, n: int) -> TopLists | None:
    rows_path, scores_path = _paths(base)
    if not (rows_path.is_file() and scores_path.is_file()):
        return None
    try:  # plain ndarray views of the maps: np.memmap's per-slice bookkeeping is slow on the request path
        rows = np.asarray(np.load(rows_path, mmap_mode="r"))
        scores = np.asarray(np.load(scores_path, mmap_mode="r"))
    except (OSError, ValueError) as exc:
        log.warning("ignoring unreadable cached top lists", extra={"path": str(base), "reason": str(exc)})
        return None
    if rows.shape != (n_users, n) or scores.shape != (n_users, n) or rows.dtype != np.int32:
        log.warning("ignoring cached top lists of the wrong shape", extra={"path": str(base)})
        return None
    return TopLists(rows, scores)


def _write(base: Path, top: TopLists) -> None:
    for path, array in zip(_paths(base), (top.rows, top.scores), strict=True):
        cache.replace_file(path, lambda tmp, a=array: _save(tmp, a))


def _save(path: Path, array: np.ndarray) -> None:
    with path.open("wb") as f:  # a file object: np.save would add ".npy" to a name
        np.save(f, array)


def _rows(ckpt: Any, kind: str) -> int:
    return len(ckpt.user_ids if kind == "users" else ckpt.item_ids)


def cached(
    ckpt: Any, kind: str, n: int, index_settings: dict[str, Any], cache_dir: Path | None
) -> TopLists | None:
    """The finished table of ``kind`` ("users" or "items") from the cache, or None (cheap: safe on the load
    path)."""
    if cache_dir is None:
        return None
    return _read(cache_dir / cache_key(ckpt, n, index_settings, kind), _rows(ckpt, kind), n)


def prepare(
    ckpt: Any,
    kind: str,
    excluded: sparse.csr_matrix,
    index: Any,
    n: int,
    index_settings: dict[str, Any],
    cache_dir: Path | None,
) -> TopLists:
    """Read the cached table or build it (see app.serving.cache: one builder per entry, others wait).

    ``kind`` "users": queries are the user embeddings; "items": the item embeddings (similar items)."""
    faiss.omp_set_num_threads(1)  # a background job: leave the other core to requests
    n_rows = _rows(ckpt, kind)

    def make() -> TopLists:
        source = ckpt.user_embeddings if kind == "users" else ckpt.item_embeddings
        return build(np.asarray(source, dtype=np.float32), excluded, index, n)

    return cache.shared(
        cache_dir,
        cache_key(ckpt, n, index_settings, kind),
        read=lambda base: _read(base, n_rows, n),
        build=make,
        write=_write,
        what="top-list",
    )
