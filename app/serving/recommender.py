"""The serving core: a user's recommendations and an item's similar items, below HTTP.

Every way of asking calls this: the event-loop fast path and the FastAPI handlers (app.api.routes) and
``recsys recommend`` (app.train_cli). A recommendation goes through five steps, each one method:

1. ``history``: what the user did that the checkpoint does not hold (events after its watermark; every
   event for users it does not know), split into positives and explicit negatives: the worker's in-memory
   view when it can tell (model users), else one database read.
2. ``user_vector``: where the query vector comes from: the trained embedding for model users with nothing
   new (source ``model``), the same user's vector remade with their new positives and dislikes
   (``model+recent``), the vector of a cold user's positive events (``fold_in``), none (``popular``).
3. ``exclusions`` and ``checkpoint_exclusions``: seen items (since the watermark, and the checkpoint's)
   unless ``exclude_seen=false``, explicit negatives (always), the caller's ``exclude``; hidden items are
   skipped by every ranking.
4. ``rank``: the precomputed top list when it ranks by that vector with those exclusions (a trained vector,
   seen items out, no filters), else a search; the filtered search (the filter applied inside FAISS) with
   ``exclude``/``only``/``category``; the popularity order when there is no vector.
5. ``explanations`` (``explain=true``), then ``record``: the source counter and the impression row, in
   the sink the caller passes (the service's writer; none for a batch export or an operator's view).

``on_loop=True`` (the event loop's fast path) answers only what needs neither the database nor an
expensive search and returns None otherwise; the caller then hands the request to the threadpool
handler, which asks again without the flag and gets the same answer the fast path would have given.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
from sqlalchemy import Engine

from app.db.impressions import Served
from app.db.userdata import RECENT_LIMIT, recent_events
from app.serving import metrics
from app.serving.model import Ranked, ServedModel

EXPLAIN_HISTORY = 2000  # history items compared by `explain` (newest events first, then checkpoint ones)
LOOP_MAX_FETCH = 256  # k + excluded items up to this: a cheap search is done on the event loop
_NO_ROWS = np.zeros(0, dtype=np.int32)


class RecentItems(Protocol):
    """The worker's in-memory view of events since the watermark (app.api.recent.RecentEventsView):
    (touched, positive, negative) item ids, newest first, or None when it cannot tell."""

    def events_for(self, user_id: str, watermark: int) -> tuple[list[str], list[str], list[str]] | None: ...


class ImpressionSink(Protocol):
    """Where served lists go (app.db.impressions.ImpressionWriter); False: dropped (queue full)."""

    def submit(self, served: Served) -> bool: ...


class UnknownItem(LookupError):
    """Similar items were asked for an item the served model does not hold."""


# Plain slotted dataclasses on the request path: a frozen one costs ~1 µs more per instance (bench/serve.py's
# recommendation builds five), and nothing here is shared between requests.
@dataclass(slots=True)
class Ask:
    """One recommendation request, in external ids (the HTTP layer has validated and split them)."""

    user_id: str
    k: int = 10
    exclude_seen: bool = True
    exclude: Sequence[str] = ()
    only: Sequence[str] | None = None  # None: no restriction
    category: str | None = None
    explain: bool = False


@dataclass(frozen=True, slots=True)
class Filters:
    """A request's own filters, as item rows of the served model."""

    exclude: list[int]
    only: np.ndarray | None  # None: no restriction

    @property
    def active(self) -> bool:
        return bool(self.exclude) or self.only is not None


NO_FILTERS = Filters([], None)


@dataclass(slots=True)
class History:
    """A user's events the checkpoint does not hold, as item ids, newest first."""

    touched: list[str]  # every item with an event
    positives: list[str] = field(default_factory=list)  # items with a positive event
    negatives: list[str] = field(default_factory=list)  # items with an explicit negative (RECSYS_NEGATIVE_TYPES)


@dataclass(slots=True)
class UserVector:
    values: np.ndarray | None  # None: nothing to rank by (the popular fallback)
    source: str  # model | model+recent | fold_in | popular
    listed: bool = False  # the user's trained embedding: their precomputed top list ranks by exactly it


@dataclass(slots=True)
class Listing:
    """Ranked items of one answer, ready to serialise."""

    model: ServedModel
    ranked: Ranked
    because: list[list[tuple[int, float]]] | None = None
    item_ids: list[str] = field(init=False)  # external ids, best first

    def __post_init__(self) -> None:
        self.item_ids = self.model.item_ids[self.ranked.rows].tolist()

    def items(self) -> list[dict[str, Any]]:
        scores = self.ranked.scores.tolist()
        items = [
            {"item_id": i, "score": s, "rank": r}
            for r, (i, s) in enumerate(zip(self.item_ids, scores, strict=True), 1)
        ]
        if self.because is not None:
            item_ids = self.model.item_ids
            for item, because in zip(items, self.because, strict=True):
                item["because"] = [{"item_id": item_ids[r], "contribution": c} for r, c in because]
        return items


@dataclass(slots=True)
class Recommendation(Listing):
    user_id: str = ""
    source: str = "model"

    def body(self, request_id: str) -> dict[str, Any]:
        return {
            "user_id": self.user_id,
            "model_version": self.model.version,
            "request_id": request_id,
            "source": self.source,
            "items": self.items(),
        }


@dataclass(slots=True)
class SimilarItems(Listing):
    item_id: str = ""

    def body(self, request_id: str) -> dict[str, Any]:
        return {
            "item_id": self.item_id,
            "model_version": self.model.version,
            "request_id": request_id,
            "items": self.items(),
        }


class Recommender:
    """Answers against the model it is given (the caller reads ``holder.current`` once per request).

    ``engine``: where users' events are read when the in-memory view cannot tell (None: no events are
    known beyond the checkpoint); ``recent``: that view; ``fresh_weight``: how many of their checkpoint
    positives one positive event since the watermark counts as in a model user's remade vector
    (RECSYS_FRESH_WEIGHT).
    """

    def __init__(
        self,
        engine: Engine | None,
        negative_types: Collection[str],
        *,
        recent: RecentItems | None = None,
        fresh_weight: int = 10,
    ) -> None:
        self.engine = engine
        self.negative_types = negative_types
        self.recent = recent
        self.fresh_weight = fresh_weight

    # --- recommendations ------------------------------------------------------------------------
    def recommend(
        self,
        model: ServedModel,
        ask: Ask,
        request_id: str = "",
        *,
        impressions: ImpressionSink | None = None,
        on_loop: bool = False,
    ) -> Recommendation | None:
        """The user's list (None only with ``on_loop``, when the answer needs the threadpool), logged to
        ``impressions`` (None: a list nobody is shown, such as a batch export or an operator's view)."""
        plain = not (ask.exclude or ask.only is not None or ask.category is not None)
        filters = NO_FILTERS if plain else self.filters(model, ask.exclude, ask.only, ask.category)
        row = model.user_row(ask.user_id)
        if on_loop and (row is None or not plain or not ask.exclude_seen or ask.explain):
            return None  # a cold user (a database read), a filtered search, seen items allowed, explanations
        history = self.history(model, ask.user_id, row, on_loop=on_loop)
        if history is None:
            return None
        vector = self.user_vector(model, row, history)
        since = self.exclusions(model, history, ask.exclude_seen, filters)
        ranked = self.rank(model, vector, row, ask.k, since, filters, ask.exclude_seen, on_loop=on_loop)
        if ranked is None:
            return None
        because = self.explanations(model, vector, row, history, ranked) if ask.explain else None
        answer = Recommendation(model, ranked, because, ask.user_id, vector.source)
        self.record(answer, request_id, impressions)
        return answer

    def filters(
        self, model: ServedModel, exclude: Sequence[str], only: Sequence[str] | None, category: str | None
    ) -> Filters:
        """The caller's filters as rows; unknown ids are ignored, ``only`` and ``category`` intersect."""
        allowed: np.ndarray | None = None
        if only is not None:
            allowed = np.unique(np.asarray(model.rows_of(list(only)), dtype=np.int64))
        if category is not None:
            rows = model.category_rows(category)
            allowed = rows if allowed is None else np.intersect1d(allowed, rows)
        return Filters(model.rows_of(list(exclude)), allowed)

    def history(
        self, model: ServedModel, user_id: str, row: int | None, *, on_loop: bool = False
    ) -> History | None:
        """Events after the watermark for model users (the in-memory view when it can tell), every event
        for others (the view holds only events after the watermark). None: ``on_loop`` and the database is
        needed."""
        since = model.watermark if row is not None else 0
        if row is not None and self.recent is not None:
            events = self.recent.events_for(user_id, since)
            if events is not None:
                return History(*events)
        if on_loop:
            return None
        if self.engine is None:
            return History([], [], [])
        with self.engine.connect() as conn:
            events = recent_events(conn, user_id, since, self.negative_types)
        return History(events.item_ids, events.positive_item_ids, events.negative_item_ids)

    def user_vector(self, model: ServedModel, row: int | None, history: History) -> UserVector:
        """Where the query vector comes from: the one place that decides it.

        A model user whose events since the watermark change nothing the model knows (none, unknown
        items, items already among their positives, dislikes of items that never were) keeps the trained
        vector and its precomputed list (``model``, ``listed``). Otherwise the vector is remade from their
        positives plus the new ones minus the items disliked since (``ServedModel.query_vector``: the
        tower's own rule when it pools a history table, a fold-in blend otherwise) and searched
        (``model+recent``). A cold user's positives go through the same call (``fold_in``)."""
        if row is not None:
            added, removed = self.changes(model, row, history)
            if not added and not removed:
                return UserVector(model.user_vector(row), "model", listed=True)
            vector = model.query_vector(row, added, removed, self.fresh_weight)
            return UserVector(None, "popular") if vector is None else UserVector(vector, "model+recent")
        disliked = set(history.negatives)
        rows = model.rows_of(list(dict.fromkeys(i for i in history.positives if i not in disliked)))
        vector = model.fold_in(rows)
        return UserVector(None, "popular") if vector is None else UserVector(vector, "fold_in")

    @staticmethod
    def changes(model: ServedModel, row: int, history: History) -> tuple[list[int], list[int]]:
        """Item rows to add to and remove from a model user's positives: new positives the checkpoint does
        not hold as theirs (the newest RECENT_LIMIT, as the database read gives), and their positives
        disliked since (a dislike wins over a like since)."""
        if not history.positives and not history.negatives:
            return [], []
        held = set(model.positive_rows(row).tolist())
        negative = set(model.rows_of(history.negatives))
        added = [r for r in dict.fromkeys(model.rows_of(history.positives)) if r not in held and r not in negative]
        return added[:RECENT_LIMIT], [r for r in negative if r in held]

    def exclusions(self, model: ServedModel, history: History, exclude_seen: bool, filters: Filters) -> list[int]:
        """Rows to leave out that the checkpoint does not know: items touched since (with ``exclude_seen``)
        or the explicit negatives since (without), and the caller's ``exclude``. The checkpoint's own are
        in ``checkpoint_exclusions``."""
        since = model.rows_of(history.touched if exclude_seen else history.negatives)
        if filters.exclude:
            since.extend(filters.exclude)
        return since

    @staticmethod
    def checkpoint_exclusions(model: ServedModel, row: int | None, exclude_seen: bool) -> np.ndarray:
        """A model user's exclusions in the checkpoint: seen items and explicit negatives (only the
        negatives without ``exclude_seen``). The user's top list was built without them."""
        if row is None:
            return _NO_ROWS
        return model.seen_rows(row) if exclude_seen else model.negative_rows(row)

    def rank(
        self,
        model: ServedModel,
        vector: UserVector,
        row: int | None,
        k: int,
        since: list[int],
        filters: Filters,
        exclude_seen: bool,
        *,
        on_loop: bool = False,
    ) -> Ranked | None:
        """Top list, search, filtered search or popularity order (None: ``on_loop`` and too costly)."""
        if vector.listed and row is not None and exclude_seen and not filters.active:
            found = model.from_top_list(row, k, since)
            if found is not None:
                return found
        checkpoint = self.checkpoint_exclusions(model, row, exclude_seen)
        excluded = since + checkpoint.tolist() if len(checkpoint) else since
        if vector.values is None:
            return model.popular(k, excluded, filters.only)
        if filters.active:
            return model.search_filtered(vector.values, k, excluded, filters.only)
        if on_loop and (not model.cheap_search or k + len(excluded) + model.n_hidden > LOOP_MAX_FETCH):
            return None
        return model.search(vector.values, k, excluded)

    def explanations(
        self, model: ServedModel, vector: UserVector, row: int | None, history: History, ranked: Ranked
    ) -> list[list[tuple[int, float]]]:
        """Per item, the (at most 3) history items most similar to it: positive events since the
        watermark, then the checkpoint's positives, less the items disliked since; none for the popular
        fallback."""
        rows: list[int] = []
        if vector.source != "popular":
            rows = model.rows_of(history.positives)
            if row is not None:
                rows.extend(model.positive_rows(row).tolist())
            disliked = set(model.rows_of(history.negatives))
            if disliked:
                rows = [r for r in rows if r not in disliked]
        hist = np.unique(np.asarray(rows[:EXPLAIN_HISTORY], dtype=np.int64))
        return model.explain(ranked.rows, hist)

    @staticmethod
    def record(answer: Recommendation, request_id: str, impressions: ImpressionSink | None) -> None:
        """Count the list by source and log it to ``impressions`` (when it has items)."""
        metrics.RECOMMENDATIONS_BY_SOURCE[answer.source].inc()
        if answer.source in metrics.FALLBACK_SOURCES:
            metrics.FALLBACKS.labels(answer.source).inc()
        if impressions is not None and answer.item_ids:
            served = Served(request_id, answer.user_id, answer.item_ids, answer.model.version)
            if not impressions.submit(served):
                metrics.IMPRESSIONS_DROPPED.inc()

    # --- similar items --------------------------------------------------------------------------
    def similar(
        self,
        model: ServedModel,
        item_id: str,
        k: int,
        filters: Filters = NO_FILTERS,
        *,
        on_loop: bool = False,
    ) -> SimilarItems | None:
        """Nearest items by dot product, the item itself and hidden items left out; raises UnknownItem
        (None with ``on_loop``: the threadpool handler raises it). ``on_loop`` answers from the item's
        precomputed list only."""
        row = model.item_row(item_id)
        if row is None:
            if on_loop:
                return None
            raise UnknownItem(item_id)
        ranked = None if filters.active else model.similar_from_list(row, k)
        if ranked is None:
            if on_loop:
                return None
            exclude = [row, *filters.exclude]
            if filters.active:
                ranked = model.search_filtered(model.item_vector(row), k, exclude, filters.only)
            else:
                ranked = model.search(model.item_vector(row), k, exclude)
        return SimilarItems(model, ranked, None, item_id)
