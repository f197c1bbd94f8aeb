"""A checkpoint made ready to serve: everything a request needs is computed once, at load.

Id maps, the popularity order and the FAISS index are built here so a request only does one
index search (or one masked walk down the popularity order) plus a small filter. Torch-free.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# One query vector per request: an OpenMP team per search costs more than it saves, and its spinning
# threads fight the request threads for the cores. Set before faiss loads its OpenMP runtime.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import faiss  # noqa: E402
import numpy as np  # noqa: E402
from scipy import sparse  # noqa: E402

from app.serving import ann, toplists  # noqa: E402
from trainer import towers  # noqa: E402
from trainer.checkpoint import Checkpoint, CheckpointError, read_checkpoint  # noqa: E402

log = logging.getLogger("recsys.model")

_omp = threading.local()
EXACT_MAX = 4096  # filtered candidate sets up to this size are scored exactly instead of through FAISS
SMALL_FETCH = 64  # up to this many hits are filtered in plain Python (numpy's per-call cost dominates)


def _invert(by_row: dict[int, list[str]]) -> dict[str, np.ndarray]:
    out: dict[str, list[int]] = {}
    for row, cats in by_row.items():
        for cat in cats:
            out.setdefault(cat, []).append(row)
    return {cat: np.array(sorted(rows), dtype=np.int64) for cat, rows in out.items()}


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
    index: Any  # exact (or the checkpoint's own) index: filtered searches and the fallback
    item_ids: np.ndarray  # row → external id (object array, for fast fancy indexing)
    pop_order: np.ndarray  # item rows by popularity, most popular first
    hidden: np.ndarray  # bool per item row; replaced wholesale when the hidden set is refreshed
    n_hidden: int
    excluded: sparse.csr_matrix  # checkpoint's seen items plus its explicit negatives, per user row
    load_seconds: float
    loaded_at: float = field(default_factory=time.time)
    # category → sorted item rows; built at load, replaced wholesale on refresh or by a PUT of an item
    categories: dict[str, np.ndarray] = field(default_factory=dict)
    _row_categories: dict[int, list[str]] = field(default_factory=dict)
    _edit: threading.Lock = field(default_factory=threading.Lock)
    # the approximate index unfiltered searches use once built (see app.serving.ann); None: exact search
    ann: Any = None
    ann_info: ann.AnnInfo | None = None
    ann_pending: bool = False  # a background thread is still building ``ann``
    # every model user's precomputed best items and every item's most similar ones (app.serving.toplists);
    # None until built, or when off
    top: toplists.TopLists | None = None
    top_similar: toplists.TopLists | None = None
    top_pending: bool = False  # a background thread is still building the lists
    # plain ndarray views of the (memory-mapped) embeddings: np.memmap's per-slice bookkeeping costs
    # more than the rest of a row lookup
    _user_emb: np.ndarray = field(init=False, repr=False)
    _item_emb: np.ndarray = field(init=False, repr=False)
    # how query vectors are made (trainer/towers.py); ``recorded``: the manifest names it (else an old
    # checkpoint: raw free vectors, no bias, nothing normalised)
    tower: towers.UserTower = field(init=False, repr=False)
    recorded: bool = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self._user_emb = np.asarray(self.ckpt.user_embeddings, dtype=np.float32)
        self._item_emb = np.asarray(self.ckpt.item_embeddings, dtype=np.float32)
        self.tower = self.ckpt.tower
        self.recorded = bool(self.ckpt.manifest.get("user_tower"))

    @property
    def pooled(self) -> bool:
        """The tower pools a history table: a user's vector is remade exactly from their items."""
        return self.tower.pooled and self.ckpt.history_embeddings is not None

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

    def positive_rows(self, user_row: int) -> np.ndarray:
        """The items the checkpoint trained on as this user's positives."""
        seen = self.ckpt.seen
        return seen.indices[seen.indptr[user_row] : seen.indptr[user_row + 1]]

    def negative_rows(self, user_row: int) -> np.ndarray:
        """The user's explicit negatives in the checkpoint: excluded even when seen items are allowed."""
        feedback = getattr(self.ckpt, "feedback", None)
        if feedback is None or not feedback.nnz:
            return np.zeros(0, dtype=np.int32)
        return feedback.indices[feedback.indptr[user_row] : feedback.indptr[user_row + 1]]

    @property
    def cheap_search(self) -> bool:
        """An unfiltered search costs tens of microseconds: approximate index, or a small catalogue (the
        serving core's event-loop path searches only then)."""
        return (
            self.ann is not None
            or self.n_items <= ann.ANN_MIN_ITEMS
            or not isinstance(self.index, faiss.IndexFlat)
        )

    def from_top_list(self, user_row: int, k: int, recent_rows: list[int]) -> Ranked | None:
        """The first ``k`` items of the user's precomputed list that are neither hidden nor in
        ``recent_rows``; None when there is no list or it runs out first (the caller searches)."""
        return self._walk(self.top, user_row, k, set(recent_rows))

    def similar_from_list(self, item_row: int, k: int) -> Ranked | None:
        """The first ``k`` visible items of the item's precomputed similar list, or None (search)."""
        return self._walk(self.top_similar, item_row, k, set())

    def _walk(self, top: toplists.TopLists | None, row: int, k: int, skip: set[int]) -> Ranked | None:
        if top is None or k > top.n:
            return None
        hidden, n_hidden = self.hidden, self.n_hidden
        if not skip and not n_hidden:  # the common case: the list's first k, if the index found k
            first = top.rows[row, :k]
            return Ranked(first.astype(np.int64), top.scores[row, :k]) if first[-1] >= 0 else None
        kept: list[int] = []
        at: list[int] = []
        for i, r in enumerate(top.rows[row].tolist()):
            if r < 0:
                return None  # the index found fewer hits than the list holds
            if r in skip or (n_hidden and hidden[r]):
                continue
            kept.append(r)
            at.append(i)
            if len(kept) == k:
                return Ranked(np.array(kept, dtype=np.int64), top.scores[row, at])
        return None

    def search_index(self) -> tuple[Any, dict[str, Any]]:
        """The index unfiltered searches use, and the settings that make its answers what they are."""
        info = self.ann_info
        if self.ann is not None and info is not None:
            return self.ann, {"index": info.kind, "nlist": info.nlist, "nprobe": info.nprobe}
        return self.index, {"index": type(self.index).__name__, "ntotal": int(self.index.ntotal)}

    def user_vector(self, user_row: int) -> np.ndarray:
        return self._user_emb[user_row]

    def item_vector(self, item_row: int) -> np.ndarray:
        return self._item_emb[item_row]

    def fold_in(self, item_rows: list[int]) -> np.ndarray | None:
        """A cold user's vector from their positive item rows (None: none): see ``query_vector``."""
        return self.query_vector(None, item_rows, [])

    def query_vector(
        self, user_row: int | None, added: list[int], removed: list[int], weight: int = 1
    ) -> np.ndarray | None:
        """A user's query vector from the checkpoint's positives of ``user_row`` (None: a cold user), plus
        the ``added`` positive item rows (not among them), minus the ``removed`` ones; each added row
        counts ``weight`` times. None: nothing to go on.

        A pooled tower applies trainer/towers.py's rule to that multiset of rows (with the user's free
        vector when the tower has one): with ``weight=1`` exactly what training's export computes for the
        same items. The pooled sum is normalised afterwards, so repeating a row ``weight`` times is the
        same as weighing it ``weight`` times. Other towers cannot be remade from items; see ``blend``."""
        if not self.pooled:
            return self.blend(user_row, added, removed, weight)
        rows = np.repeat(np.asarray(added, dtype=np.int64), weight)
        free = None
        if user_row is not None:
            held = self.positive_rows(user_row).astype(np.int64)
            if removed:
                held = np.setdiff1d(held, np.asarray(removed, dtype=np.int64))
            rows = np.concatenate([held, rows])
            table = self.ckpt.user_free_embeddings
            if self.tower.free and table is not None:
                free = np.asarray(table[user_row], dtype=np.float32)
        return towers.query(self.tower, self.ckpt.history_embeddings, rows, free)

    def blend(
        self, user_row: int | None, added: list[int], removed: list[int], weight: int = 1
    ) -> np.ndarray | None:
        """Fold-in for a tower without a history table (``--tower free``, old checkpoints): the trained
        vector counts as the mean of the user's n₀ checkpoint positives, each new positive as ``w`` more
        items and each removed one as one less, so ``v = (n₀·f + w·Σ_added e_j − Σ_removed e_j) /
        (n₀ + w·a − r)`` with ``f`` the trained direction and ``e_j`` the item vectors without their bias
        column (both unit length when the manifest records the tower; raw for old checkpoints).
        ``towers.finish`` then makes the query (old checkpoints: ``v`` as it is). A cold user (n₀ = 0)
        gets the mean of their items, whatever ``w``."""
        items = towers.items_as_history(self._item_emb, self.tower)
        n0 = 0 if user_row is None else max(len(self.positive_rows(user_row)), 1)
        if n0 + len(added) == 0:
            return None
        total = np.zeros(items.shape[1], dtype=np.float32)
        if user_row is not None:
            free = towers.items_as_history(self._user_emb[user_row : user_row + 1], self.tower)[0]
            total += n0 * (free / max(float(np.linalg.norm(free)), towers.EPS) if self.recorded else free)
        if added:
            total += weight * items[np.asarray(added, dtype=np.int64)].sum(axis=0)
        if removed:
            total -= items[np.asarray(removed, dtype=np.int64)].sum(axis=0)
        v = total / max(n0 + weight * len(added) - len(removed), 1)
        return towers.finish(self.tower, v) if self.recorded else v

    def search(self, vector: np.ndarray, k: int, exclude: np.ndarray | list[int]) -> Ranked:
        """Top ``k`` items by dot product, skipping hidden and ``exclude`` rows.

        Uses the approximate index when there is one; if it returns too few hits after filtering, the
        exact index completes the list (widening to the whole catalogue at worst).
        """
        hidden, n_hidden = self.hidden, self.n_hidden
        fetch = min(self.n_items, k + len(exclude) + n_hidden)
        query = vector.reshape(1, -1).astype(np.float32, copy=False)
        _single_threaded()
        index = self.ann if self.ann is not None else self.index
        while True:
            scores, rows = index.search(query, fetch)
            if fetch <= SMALL_FETCH:
                skip = set(exclude.tolist() if isinstance(exclude, np.ndarray) else exclude)
                out_rows: list[int] = []
                out_scores: list[float] = []
                for r, sc in zip(rows[0].tolist(), scores[0].tolist(), strict=True):
                    if r < 0 or r in skip or (n_hidden and hidden[r]):
                        continue
                    out_rows.append(r)
                    out_scores.append(sc)
                    if len(out_rows) == k:
                        break
                kept_rows = np.array(out_rows, dtype=np.int64)
                kept_scores = np.array(out_scores, dtype=np.float32)
            else:
                scores, rows = scores[0], rows[0]
                keep = rows >= 0
                if n_hidden:
                    keep &= ~hidden[np.clip(rows, 0, None)]
                if len(exclude):
                    keep &= ~np.isin(rows, np.asarray(exclude, dtype=np.int64))
                kept_rows, kept_scores = rows[keep], scores[keep]
            if len(kept_rows) >= k or (fetch >= self.n_items and index is self.index):
                return Ranked(kept_rows[:k], kept_scores[:k])
            if index is self.index:
                fetch = self.n_items
            index = self.index  # an approximate index missed: the exact one finishes the job

    def popular(
        self, k: int, exclude: np.ndarray | list[int], only: np.ndarray | list[int] | None = None
    ) -> Ranked:
        """The most popular visible items not in ``exclude`` (and in ``only`` when given); scores are the
        training interaction counts."""
        allowed = self.valid_mask(exclude, only)
        order = self.pop_order[allowed[self.pop_order]][:k]
        return Ranked(order, self.ckpt.item_popularity[order].astype(np.float32))

    def valid_mask(self, exclude: np.ndarray | list[int], only: np.ndarray | list[int] | None) -> np.ndarray:
        """True for the rows a request may return: visible, not excluded, and in ``only`` when given."""
        if only is not None:
            mask = np.zeros(self.n_items, dtype=bool)
            mask[np.asarray(only, dtype=np.int64)] = True
            mask &= ~self.hidden
        else:
            mask = ~self.hidden
        exclude = np.asarray(exclude, dtype=np.int64)
        if exclude.size:
            mask[exclude] = False
        return mask

    def search_filtered(
        self,
        vector: np.ndarray,
        k: int,
        exclude: np.ndarray | list[int],
        only: np.ndarray | list[int] | None = None,
    ) -> Ranked:
        """Top ``k`` among the valid rows (see ``valid_mask``), the filter applied inside the search.

        A small candidate set (at most EXACT_MAX rows) is scored exactly against the item embeddings;
        otherwise FAISS searches with an ``IDSelectorBitmap`` of the valid rows, so it returns ``k`` hits
        whenever ``k`` valid rows exist (an approximate index that returns fewer is completed exactly).
        """
        mask = self.valid_mask(exclude, only)
        n_valid = int(mask.sum())
        want = min(k, n_valid)
        if want == 0:
            return Ranked(np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.float32))
        query = vector.reshape(1, -1).astype(np.float32, copy=False)
        if n_valid > EXACT_MAX:
            _single_threaded()
            bitmap = np.packbits(mask, bitorder="little")
            params = faiss.SearchParameters(sel=faiss.IDSelectorBitmap(bitmap))
            scores, rows = self.index.search(query, want, params=params)
            scores, rows = scores[0], rows[0]
            keep = rows >= 0
            keep[keep] &= mask[rows[keep]]
            if int(keep.sum()) >= want:
                return Ranked(rows[keep][:want], scores[keep][:want])
        return self._exact(query[0], np.flatnonzero(mask), want)

    def _exact(self, vector: np.ndarray, rows: np.ndarray, k: int) -> Ranked:
        scores = np.asarray(self.ckpt.item_embeddings[rows], dtype=np.float32) @ vector
        if k < len(rows):
            top = np.argpartition(-scores, k - 1)[:k]
            rows, scores = rows[top], scores[top]
        order = np.lexsort((rows, -scores))
        return Ranked(rows[order].astype(np.int64), scores[order].astype(np.float32))

    def category_rows(self, category: str) -> np.ndarray:
        return self.categories.get(category, np.zeros(0, dtype=np.int64))

    def set_categories(self, item_categories: dict[str, list[str]]) -> None:
        """Rebuild the category → rows index from external item id → categories (items not served are skipped)."""
        get = self.ckpt.item_row.get
        by_row = {row: cats for item, cats in item_categories.items() if (row := get(item)) is not None}
        with self._edit:
            self._row_categories = by_row
            self.categories = _invert(by_row)

    def update_item(self, item_id: str, hidden: bool | None, categories: list[str] | None) -> None:
        """Apply one item's new hidden flag and/or categories at once (a PUT on this worker)."""
        row = self.item_row(item_id)
        if row is None:
            return
        with self._edit:
            if hidden is not None and bool(self.hidden[row]) != hidden:
                mask = self.hidden.copy()
                mask[row] = hidden
                self.hidden, self.n_hidden = mask, int(mask.sum())
            if categories is not None and self._row_categories.get(row, []) != categories:
                by_row = dict(self._row_categories)
                if categories:
                    by_row[row] = categories
                else:
                    by_row.pop(row, None)
                self._row_categories = by_row
                self.categories = _invert(by_row)

    def explain(
        self, rec_rows: np.ndarray, history_rows: np.ndarray, top: int = 3
    ) -> list[list[tuple[int, float]]]:
        """For each recommended row, the ``top`` history rows with the largest positive item-item dot
        product (the contribution of that history item), best first."""
        if not len(history_rows) or not len(rec_rows):
            return [[] for _ in range(len(rec_rows))]
        emb = self.ckpt.item_embeddings
        rec = np.asarray(emb[np.asarray(rec_rows)], dtype=np.float32)
        hist = np.asarray(emb[np.asarray(history_rows)], dtype=np.float32)
        sims = rec @ hist.T
        out = []
        n = min(top, len(history_rows))
        for i in range(len(rec_rows)):
            row = sims[i]
            best = np.argpartition(-row, n - 1)[:n] if n < len(row) else np.arange(len(row))
            best = best[np.argsort(-row[best], kind="stable")]
            out.append([(int(history_rows[j]), float(row[j])) for j in best if row[j] > 0])
        return out

    def set_hidden(self, hidden_ids: list[str]) -> None:
        """Replace the hidden mask; a reader that sees a stale count widens its search (see ``search``)."""
        mask = np.zeros(self.n_items, dtype=bool)
        rows = self.rows_of(hidden_ids)
        if rows:
            mask[rows] = True
        with self._edit:
            self.hidden = mask
            self.n_hidden = int(mask.sum())


def open_checkpoint(path: str | Path) -> tuple[Checkpoint, Any]:
    """The verified checkpoint (memory-mapped) and its FAISS index; CheckpointError when it cannot serve."""
    ckpt = read_checkpoint(path, mmap=True)
    try:
        index = ckpt.load_index()
    except RuntimeError as exc:  # FAISS reports unreadable files as RuntimeError
        raise CheckpointError(f"{path}: cannot read the FAISS index ({exc})") from exc
    if index.ntotal != len(ckpt.item_ids) or index.d != ckpt.dim:
        raise CheckpointError(f"{path}: FAISS index does not match the item embeddings")
    return ckpt, index


def load_model(
    path: str | Path,
    hidden_ids: list[str] | None = None,
    item_categories: dict[str, list[str]] | None = None,
    index_cache: Path | None = None,
    ann_min_items: int | None = None,
    on_ann_ready: Callable[[ServedModel], None] | None = None,
    top_n: int = toplists.DEFAULT_N,
    wait: bool = False,
    similar: bool = True,
) -> ServedModel:
    """Read, verify and prepare a checkpoint (blocking: call it from a thread, never the event loop).

    A catalogue over ``ann_min_items`` (default ``ann.ANN_MIN_ITEMS``) served by an exact index gets an
    IVF index (see app.serving.ann); every user gets a precomputed list of their ``top_n`` items and every
    item one of its ``top_n`` most similar items (see app.serving.toplists; 0: none). Both are read from
    ``index_cache`` when already built, else built in one background thread while plain search serves, so
    readiness does not wait for them; ``wait=True`` builds them before returning (batch use).
    ``similar=False`` leaves the items' lists out (batch recommendations never read them: on a 361k-item
    catalogue they took two of `recsys recommend --all`'s three minutes).
    """
    start = time.perf_counter()
    ckpt, index = open_checkpoint(path)
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
    model.set_categories(item_categories or {})
    threshold = ann.ANN_MIN_ITEMS if ann_min_items is None else ann_min_items
    wants_ann, wants_top = _from_cache(model, index_cache, threshold, top_n, similar)
    if wants_ann or wants_top:
        model.ann_pending, model.top_pending = wants_ann, wants_top
        args = (model, index_cache, top_n, on_ann_ready, similar)
        if wait:
            _prepare_in_background(*args)
        else:
            threading.Thread(target=_prepare_in_background, args=args, name="serving-prep", daemon=True).start()
    model.load_seconds = time.perf_counter() - start
    return model


def _from_cache(model: ServedModel, index_cache: Path | None, threshold: int, top_n: int,
                similar: bool) -> tuple[bool, bool]:
    """Attach the IVF index and the top lists already built for this checkpoint; return which of the
    two are still to build (the IVF index first: the top lists are searched with it)."""
    wants_ann = False
    if not isinstance(model.index, faiss.IndexFlat):  # the checkpoint already ships an approximate index
        model.ann_info = ann.AnnInfo(type(model.index).__name__, float("nan"), reason="checkpoint's own index")
    elif model.n_items > threshold:
        hit = ann.cached(model.ckpt, index_cache)
        if hit is not None:
            model.ann, model.ann_info = hit
        else:
            wants_ann = True
    wants_top = top_n > 0
    if wants_top and not wants_ann:
        settings = model.search_index()[1]
        model.top = toplists.cached(model.ckpt, "users", top_n, settings, index_cache)
        if similar:
            model.top_similar = toplists.cached(model.ckpt, "items", top_n, settings, index_cache)
        wants_top = model.top is None or (similar and model.top_similar is None)
    return wants_ann, wants_top


def _prepare_in_background(
    model: ServedModel, index_cache: Path | None, top_n: int, on_ready: Callable[[ServedModel], None] | None,
    similar: bool = True,
) -> None:
    """Build (or wait for another worker to build) the approximate index, then the top lists with it."""
    if model.ann_pending:
        try:
            index, info = ann.prepare(model.ckpt, model.index, index_cache)
            model.ann, model.ann_info = index, info  # ann first: a reader never sees info without its index
            log.info("serving index ready", extra={"model_version": model.version, **info.as_dict()})
        except Exception:  # exact search keeps serving
            log.exception("building the approximate index failed")
        finally:
            model.ann_pending = False
            if on_ready is not None:
                on_ready(model)
        model.top_pending = top_n > 0
    if model.top_pending:
        try:
            index, settings = model.search_index()
            lists = [("users", model.excluded)]
            if similar:  # an item is not similar to itself
                lists.append(("items", sparse.identity(model.n_items, dtype=np.float32, format="csr")))
            for kind, excluded in lists:
                t0 = time.perf_counter()
                top = toplists.prepare(model.ckpt, kind, excluded, index, top_n, settings, index_cache)
                if kind == "users":
                    model.top = top
                else:
                    model.top_similar = top
                log.info(
                    "top lists ready",
                    extra={
                        "model_version": model.version,
                        "kind": kind,
                        "rows": len(top.rows),
                        "per_row": top.n,
                        "seconds": round(time.perf_counter() - t0, 3),  # built, or waited for and read
                    },
                )
        except Exception:  # searching per request keeps serving
            log.exception("building the top lists failed")
        finally:
            model.top_pending = False
            if on_ready is not None:
                on_ready(model)
