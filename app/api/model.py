"""A checkpoint made ready to serve: everything a request needs is computed once, at load.

Id maps, the popularity order and the FAISS index are built here so a request only does one
index search (or one masked walk down the popularity order) plus a small filter. Torch-free.
"""

from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# One query vector per request: an OpenMP team per search costs more than it saves, and its spinning
# threads fight the request threads for the cores. Set before faiss loads its OpenMP runtime.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import faiss  # noqa: E402
import numpy as np  # noqa: E402
from scipy import sparse  # noqa: E402

from trainer.checkpoint import Checkpoint, CheckpointError, read_checkpoint

_omp = threading.local()


def _single_threaded() -> None:
    """OpenMP's thread count is per calling thread: pin it once in every threadpool thread."""
    if not getattr(_omp, "done", False):
        faiss.omp_set_num_threads(1)
        _omp.done = True


@dataclass
class Ranked:
    """Item rows and scores, best first."""

    rows: np.ndarray
    scores: np.ndarray


@dataclass
class ServedModel:
    """An immutable view of one checkpoint; swapped as a whole, never mutated in place (except ``hidden``)."""

    ckpt: Checkpoint
    index: Any
    item_ids: np.ndarray  # row → external id (object array, for fast fancy indexing)
    pop_order: np.ndarray  # item rows by popularity, most popular first
    hidden: np.ndarray  # bool per item row; replaced wholesale when the hidden set is refreshed
    n_hidden: int
    excluded: sparse.csr_matrix  # checkpoint's seen items plus its explicit negatives, per user row
    load_seconds: float
    loaded_at: float = field(default_factory=time.time)

    @property
    def version(self) -> str:
        return self.ckpt.version

    @property
    def watermark(self) -> int:
        return int(self.ckpt.watermark or 0)

    @property
    def n_items(self) -> int:
        return len(self.ckpt.item_ids)

    def user_row(self, user_id: str) -> int | None:
        return self.ckpt.user_row.get(user_id)

    def item_row(self, item_id: str) -> int | None:
        return self.ckpt.item_row.get(item_id)

    def rows_of(self, item_ids: list[str]) -> list[int]:
        get = self.ckpt.item_row.get
        return [r for r in (get(i) for i in item_ids) if r is not None]

    def seen_rows(self, user_row: int) -> np.ndarray:
        """Items never to recommend to this user: trained-on positives and explicit negatives."""
        seen = self.excluded
        return seen.indices[seen.indptr[user_row] : seen.indptr[user_row + 1]]

    def negative_rows(self, user_row: int) -> np.ndarray:
        """The user's explicit negatives in the checkpoint: excluded even when seen items are allowed."""
        feedback = getattr(self.ckpt, "feedback", None)
        if feedback is None or not feedback.nnz:
            return np.zeros(0, dtype=np.int32)
        return feedback.indices[feedback.indptr[user_row] : feedback.indptr[user_row + 1]]

    def user_vector(self, user_row: int) -> np.ndarray:
        return np.asarray(self.ckpt.user_embeddings[user_row], dtype=np.float32)

    def fold_in(self, item_rows: list[int]) -> np.ndarray | None:
        """A cold user's vector: the mean embedding of the items they interacted with."""
        if not item_rows:
            return None
        return np.asarray(self.ckpt.item_embeddings[item_rows], dtype=np.float32).mean(axis=0)

    def search(self, vector: np.ndarray, k: int, exclude: np.ndarray | list[int]) -> Ranked:
        """Top ``k`` items by dot product, skipping hidden and ``exclude`` rows."""
        exclude = np.asarray(exclude, dtype=np.int64)
        hidden, n_hidden = self.hidden, self.n_hidden
        fetch = min(self.n_items, k + len(exclude) + n_hidden)
        _single_threaded()
        while True:
            scores, rows = self.index.search(vector.reshape(1, -1).astype(np.float32, copy=False), fetch)
            scores, rows = scores[0], rows[0]
            keep = rows >= 0
            if n_hidden:
                keep &= ~hidden[np.clip(rows, 0, None)]
            if exclude.size:
                keep &= ~np.isin(rows, exclude)
            rows, scores = rows[keep], scores[keep]
            # An approximate index may return fewer hits than asked: widen once to the whole catalogue.
            if len(rows) >= k or fetch >= self.n_items:
                return Ranked(rows[:k], scores[:k])
            fetch = self.n_items

    def popular(self, k: int, exclude: np.ndarray | list[int]) -> Ranked:
        """The most popular visible items not in ``exclude``; scores are the training interaction counts."""
        allowed = ~self.hidden if self.hidden.size else np.ones(self.n_items, dtype=bool)
        exclude = np.asarray(exclude, dtype=np.int64)
        if exclude.size:
            allowed = allowed.copy()
            allowed[exclude] = False
        order = self.pop_order[allowed[self.pop_order]][:k]
        return Ranked(order, self.ckpt.item_popularity[order].astype(np.float32))

    def similar(self, item_row: int, k: int) -> Ranked:
        vector = np.asarray(self.ckpt.item_embeddings[item_row], dtype=np.float32)
        return self.search(vector, k, [item_row])

    def set_hidden(self, hidden_ids: list[str]) -> None:
        """Replace the hidden mask; a reader that sees a stale count widens its search (see ``search``)."""
        mask = np.zeros(self.n_items, dtype=bool)
        rows = self.rows_of(hidden_ids)
        if rows:
            mask[rows] = True
        self.hidden = mask
        self.n_hidden = int(mask.sum())


def load_model(path: str | Path, hidden_ids: list[str] | None = None) -> ServedModel:
    """Read, verify and prepare a checkpoint (blocking: call it from a thread, never the event loop)."""
    start = time.perf_counter()
    ckpt = read_checkpoint(path, mmap=True)
    try:
        index = ckpt.load_index()
    except RuntimeError as exc:  # FAISS reports unreadable files as RuntimeError
        raise CheckpointError(f"{path}: cannot read the FAISS index ({exc})") from exc
    if index.ntotal != len(ckpt.item_ids) or index.d != ckpt.dim:
        raise CheckpointError(f"{path}: FAISS index does not match the item embeddings")
    item_ids = np.array(ckpt.item_ids, dtype=object)
    pop_order = np.argsort(-np.asarray(ckpt.item_popularity), kind="stable")
    excluded = ckpt.seen
    feedback = getattr(ckpt, "feedback", None)  # optional in the checkpoint format
    if feedback is not None and feedback.nnz:
        excluded = (ckpt.seen + feedback).tocsr()
    model = ServedModel(
        ckpt=ckpt,
        index=index,
        item_ids=item_ids,
        pop_order=pop_order,
        hidden=np.zeros(len(item_ids), dtype=bool),
        n_hidden=0,
        excluded=excluded,
        load_seconds=0.0,
    )
    model.set_hidden(hidden_ids or [])
    model.load_seconds = time.perf_counter() - start
    return model
