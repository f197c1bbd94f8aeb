"""Public routes: recommendations, similar items, health, readiness and metrics (events: app.api.events).

Handlers that touch FAISS or the database are plain ``def``: FastAPI runs them in its threadpool,
keeping the event loop free (FAISS and the DB drivers release the GIL while they work). The common
recommendation (a known user, no filters, seen items known in memory, a cheap search) is answered on the
event loop by ``FastRecommendationsRoute`` instead: measured in bench/serve.py, the threadpool hop and
FastAPI's per-request parameter handling cost several times the work itself, which is a walk down the
user's precomputed list (app.api.toplists) or, before it is built, one cheap search.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated, Any

import numpy as np
import orjson
from fastapi import APIRouter, Query, Request, Response
from fastapi.routing import APIRoute
from pydantic import StringConstraints
from starlette.types import Receive, Scope, Send

from app.api import metrics
from app.api.deps import NO_MODEL, VALIDATION, ItemIdPath, UserIdPath, err, request_id, served_model
from app.api.errors import ApiError
from app.api.jsonresp import JSON
from app.api.model import Ranked, ServedModel
from app.api.schemas import (
    Health,
    Readiness,
    Recommendations,
    SimilarItems,
    _printable,
)
from app.api.userdata import recent_events
from app.db.impressions import Served

router = APIRouter()

URL_TOO_LONG = {
    400: {
        "description": "Request line over 64 KiB (e.g. very long `exclude`/`only` lists): refused by the "
        "HTTP server itself, with a plain-text body, before the application sees it.",
        "content": {"text/plain": {"schema": {"type": "string"}}},
    }
}
K = Annotated[int, Query(ge=1, le=1000, description="How many items to return (1–1000).", examples=[10])]
EXPLAIN_HISTORY = 2000  # history items compared by `explain` (newest events first, then checkpoint ones)
MAX_FILTER_IDS = 1000  # item ids in `exclude` or in `only`, after splitting on commas

MAX_FILTER_VALUES = (
    50  # repetitions of `exclude` or `only`; 50 x 512 characters keeps both under the URL limit
)
FilterValue = Annotated[str, StringConstraints(max_length=512)]
_LIMITS = (
    "At most 1000 ids in all (422 `too_many_ids` beyond), in up to 50 repetitions of up to 512 characters "
    "each; unknown ids are ignored. Keep the whole URL under 64 KiB (the server refuses longer request "
    "lines with a plain-text 400)."
)
ExcludeQuery = Annotated[
    list[FilterValue] | None,
    Query(
        max_length=MAX_FILTER_VALUES,
        description="Item ids never to return. Repeat the parameter or separate ids with commas "
        "(`exclude=i1,i2&exclude=i3`). " + _LIMITS,
        examples=[["i1,i2"]],
    ),
]
OnlyQuery = Annotated[
    list[FilterValue] | None,
    Query(
        max_length=MAX_FILTER_VALUES,
        description="Restrict candidates to these item ids (repeatable or comma-separated). Fewer than k "
        "valid ids: all of them are returned. " + _LIMITS,
        examples=[["i3,i4,i5"]],
    ),
]
CategoryQuery = Annotated[
    str | None,
    Query(
        min_length=1,
        max_length=256,
        description="Only items whose attributes have this string in `categories` (a list) or as "
        "`category` (see PUT /v1/items/{item_id}). Combined with `only` and `exclude` by intersection.",
        examples=["drama"],
    ),
]


def _split_ids(name: str, values: list[str] | None) -> list[str] | None:
    if values is None:
        return None
    ids = [part for v in values for part in v.split(",") if part]
    if len(ids) > MAX_FILTER_IDS:
        raise ApiError(
            422,
            "too_many_ids",
            f"{len(ids)} item ids in {name!r}; the limit is {MAX_FILTER_IDS}",
            [{"loc": ["query", name], "msg": f"at most {MAX_FILTER_IDS} ids", "type": "too_many_ids"}],
        )
    return ids


@dataclass(frozen=True)
class Filters:
    """A request's own filters, as item rows of the served model."""

    exclude: list[int]
    only: np.ndarray | None  # None: no restriction

    @property
    def active(self) -> bool:
        return bool(self.exclude) or self.only is not None


def _filters(
    model: ServedModel, exclude: list[str] | None, only: list[str] | None, category: str | None
) -> Filters:
    excluded = model.rows_of(_split_ids("exclude", exclude) or [])
    only_ids = _split_ids("only", only)
    allowed: np.ndarray | None = None
    if only_ids is not None:
        allowed = np.unique(np.asarray(model.rows_of(only_ids), dtype=np.int64))
    if category is not None:
        rows = model.category_rows(category)
        allowed = rows if allowed is None else np.intersect1d(allowed, rows)
    return Filters(excluded, allowed)


def _log_served(state: Any, rid: str, user_id: str, model: ServedModel, items: list[dict]) -> None:
    if items and not state.impressions.submit(
        Served(rid, user_id, [i["item_id"] for i in items], model.version)
    ):
        metrics.IMPRESSIONS_DROPPED.inc()


def _items(model: ServedModel, ranked: Ranked) -> list[dict]:
    ids = model.item_ids[ranked.rows].tolist()
    scores = ranked.scores.tolist()
    return [
        {"item_id": i, "score": s, "rank": r} for r, (i, s) in enumerate(zip(ids, scores, strict=True), 1)
    ]


TRUE = frozenset((b"1", b"on", b"t", b"true", b"y", b"yes"))  # pydantic's lax booleans
FALSE = frozenset((b"0", b"off", b"f", b"false", b"n", b"no"))
FAST_MAX_FETCH = 256  # k + excluded items up to this: the search is cheap enough for the event loop
SLOW_PARAMS = frozenset((b"exclude", b"only", b"category", b"explain"))


def _fast_params(query: bytes) -> tuple[int, bool] | None:
    """``k`` and ``exclude_seen`` when the query string is plain and valid, else None (full handler).

    Anything the full handler would treat differently or reject (filters, explain, repeated or
    percent-encoded names, values that are not plain decimal or boolean) goes to it, so validation errors
    keep their usual shape. Unknown parameters are ignored, as FastAPI does.
    """
    k, exclude_seen, seen_k, seen_ex = 10, True, False, False
    if not query:
        return k, exclude_seen
    for part in query.split(b"&"):
        if not part:
            continue
        name, _, value = part.partition(b"=")
        if name == b"k":
            if seen_k or not value.isdigit() or len(value) > 4 or not 1 <= int(value) <= 1000:
                return None
            k, seen_k = int(value), True
        elif name == b"exclude_seen":
            lowered = value.lower()
            if seen_ex or (lowered not in TRUE and lowered not in FALSE):
                return None
            exclude_seen, seen_ex = lowered in TRUE, True
        elif name in SLOW_PARAMS or b"%" in name or b"+" in name:
            return None
    return k, exclude_seen


def fast_recommendations(scope: Scope) -> bytes | None:
    """The response body for a plain recommendation, or None when the full handler must answer.

    Same result as the full handler's model-user path with ``exclude_seen=true``: same exclusion, same
    search, same impression and metrics; only the parameter parsing and the thread hop are skipped.
    """
    if scope["method"] != "GET":
        return None
    state = scope["app"].state
    model: ServedModel | None = state.holder.current
    if model is None:
        return None  # 503 from the full handler
    params = _fast_params(scope["query_string"])
    if params is None or not params[1]:
        return None  # exclude_seen=false reads the database
    k = params[0]
    user_id = _plain_id(scope, "user_id")
    if user_id is None:
        return None
    row = model.user_row(user_id)
    if row is None:
        return None  # cold user: fold-in or popular, from the database
    recent = state.recent.items_for(user_id, model.watermark)
    if recent is None:
        return None  # the in-memory view cannot tell: the full handler asks the database
    recent_rows = model.rows_of(recent) if recent else []
    ranked = model.from_top_list(row, k, recent_rows)
    if ranked is None:  # no precomputed list (yet), or it ran out: search, when that is cheap
        if not model.cheap_search:
            return None  # an exact search over a large catalogue: keep it off the loop
        recent_rows.extend(model.seen_rows(row).tolist())
        if k + len(recent_rows) + model.n_hidden > FAST_MAX_FETCH:
            return None
        ranked = model.search(model.user_vector(row), k, recent_rows)
    metrics.RECOMMENDATIONS_BY_SOURCE["model"].inc()
    rid = str(scope.get("state", {}).get("request_id", ""))
    items = _items(model, ranked)
    _log_served(state, rid, user_id, model, items)
    return orjson.dumps(
        {
            "user_id": user_id,
            "model_version": model.version,
            "request_id": rid,
            "source": "model",
            "items": items,
        }
    )


def _plain_id(scope: Scope, name: str) -> str | None:
    """The path parameter when the declared route would accept it (1–256 printable characters)."""
    value = scope["path_params"][name]
    if not 1 <= len(value) <= 256:
        return None
    try:
        _printable(value)
    except ValueError:
        return None
    return value


def fast_similar(scope: Scope) -> bytes | None:
    """The response body for plain similar items answered from the item's precomputed list, or None.

    Same result as the full handler without filters; anything else (filters, an unknown item, no list yet,
    a list that runs out) goes to it.
    """
    if scope["method"] != "GET":
        return None
    model: ServedModel | None = scope["app"].state.holder.current
    params = _fast_params(scope["query_string"])
    item_id = _plain_id(scope, "item_id")
    if model is None or params is None or item_id is None:
        return None
    row = model.item_row(item_id)
    if row is None:
        return None  # 404 from the full handler
    ranked = model.similar_from_list(row, params[0])
    if ranked is None:
        return None
    rid = str(scope.get("state", {}).get("request_id", ""))
    items = _items(model, ranked)
    return orjson.dumps(
        {"item_id": item_id, "model_version": model.version, "request_id": rid, "items": items}
    )


class FastRoute(APIRoute):
    """The declared route (documented, validated) with a fast answer tried first on the event loop; the
    subclass's ``fast`` returns the response body, or None to let the declared handler answer."""

    fast: Callable[[Scope], bytes | None]

    async def handle(self, scope: Scope, receive: Receive, send: Send) -> None:
        body = self.fast(scope)
        if body is None:
            await super().handle(scope, receive, send)
            return
        headers = [(b"content-length", str(len(body)).encode()), (b"content-type", b"application/json")]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": body})


class FastRecommendationsRoute(FastRoute):
    fast = staticmethod(fast_recommendations)


class FastSimilarRoute(FastRoute):
    fast = staticmethod(fast_similar)


def recommendations(
    request: Request,
    user_id: UserIdPath,
    k: K = 10,
    exclude_seen: Annotated[
        bool,
        Query(
            description="Leave out items the user interacted with: those in the checkpoint and "
            "those recorded since the model was trained. With `false`, the user's explicit negatives "
            "(RECSYS_NEGATIVE_TYPES, checkpoint and newer events) are still left out (one database read)."
        ),
    ] = True,
    exclude: ExcludeQuery = None,
    only: OnlyQuery = None,
    category: CategoryQuery = None,
    explain: Annotated[
        bool,
        Query(
            description="Add `because` to each item: the (at most 3) items of the user's history most "
            "similar to it in the served embeddings, i.e. why it was recommended. History: positive events "
            "since the model's watermark, then the checkpoint's positives, 2000 items at most. Costs one "
            "database read."
        ),
    ] = False,
) -> Response:
    """Users in the model get a FAISS search with their embedding (`source=model`). Users unknown to the
    model are folded in from their recorded events (`fold_in`), or get the most popular items (`popular`).
    Hidden items never appear, nor do the user's explicit negatives. `exclude`, `only` and `category` are
    applied inside the search: k items come back whenever k valid items exist.
    The served list is logged to `impressions` in the background."""
    model = served_model(request)
    state = request.app.state
    filters = _filters(model, exclude, only, category)
    row = model.user_row(user_id)
    history: list[int] = []
    if row is not None:
        if exclude_seen:
            recent = state.recent.items_for(user_id, model.watermark)
            if recent is None:  # the in-memory view cannot tell: ask the database
                with state.engine.connect() as conn:
                    recent = recent_events(
                        conn, user_id, model.watermark, state.settings.negative_types
                    ).item_ids
            rows = model.rows_of(recent)
            if filters.active:
                rows.extend(model.seen_rows(row).tolist())
        else:  # explicit negatives stay out: the checkpoint's, and those recorded since it was trained
            with state.engine.connect() as conn:
                since = recent_events(conn, user_id, model.watermark, state.settings.negative_types)
            rows = model.rows_of(since.negative_item_ids)
            rows.extend(model.negative_rows(row).tolist())
        if filters.active:
            rows.extend(filters.exclude)
            ranked = model.search_filtered(model.user_vector(row), k, rows, filters.only)
        elif exclude_seen:  # the precomputed list, or a search
            ranked = model.recommend(row, k, rows)
        else:
            ranked = model.search(model.user_vector(row), k, rows)
        source = "model"
        if explain:
            with state.engine.connect() as conn:
                since = recent_events(conn, user_id, model.watermark, state.settings.negative_types)
            history = model.rows_of(since.positive_item_ids)
            history.extend(model.positive_rows(row).tolist())
    else:
        with state.engine.connect() as conn:  # a user the model does not know: their whole history counts
            events = recent_events(conn, user_id, 0, state.settings.negative_types)
        rows = model.rows_of(events.item_ids if exclude_seen else events.negative_item_ids)
        rows.extend(filters.exclude)
        history = model.rows_of(events.positive_item_ids)
        vector = model.fold_in(history)
        if vector is not None:
            if filters.active:
                ranked = model.search_filtered(vector, k, rows, filters.only)
            else:
                ranked = model.search(vector, k, rows)
            source = "fold_in"
        else:
            ranked, source = model.popular(k, rows, filters.only), "popular"
        metrics.FALLBACKS.labels(source).inc()
    metrics.RECOMMENDATIONS_BY_SOURCE[source].inc()
    rid = request_id(request)
    items = _items(model, ranked)
    if explain:
        hist = (
            np.unique(np.asarray(history[:EXPLAIN_HISTORY], dtype=np.int64))
            if source != "popular"
            else np.zeros(0, np.int64)
        )
        for item, because in zip(items, model.explain(ranked.rows, hist), strict=True):
            item["because"] = [{"item_id": model.item_ids[r], "contribution": c} for r, c in because]
    _log_served(state, rid, user_id, model, items)
    return JSON(
        {
            "user_id": user_id,
            "model_version": model.version,
            "request_id": rid,
            "source": source,
            "items": items,
        }
    )


router.add_api_route(
    "/v1/users/{user_id}/recommendations",
    recommendations,
    methods=["GET"],
    route_class_override=FastRecommendationsRoute,
    tags=["recommendations"],
    summary="Top-k items for a user",
    response_model=Recommendations,
    responses={**VALIDATION, **NO_MODEL, **URL_TOO_LONG},
)


def similar(
    request: Request,
    item_id: ItemIdPath,
    k: K = 10,
    exclude: ExcludeQuery = None,
    only: OnlyQuery = None,
    category: CategoryQuery = None,
) -> Response:
    """Nearest items by dot product of item embeddings; hidden items and the query item are left out.
    `exclude`, `only` and `category` are applied inside the search (k items whenever k valid ones exist)."""
    model = served_model(request)
    row = model.item_row(item_id)
    if row is None:
        raise ApiError(404, "unknown_item", f"item {item_id!r} is not in model {model.version}")
    filters = _filters(model, exclude, only, category)
    if filters.active:
        vector = np.asarray(model.ckpt.item_embeddings[row], dtype=np.float32)
        ranked = model.search_filtered(vector, k, [row, *filters.exclude], filters.only)
    else:
        ranked = model.similar(row, k)
    items = _items(model, ranked)
    return JSON(
        {
            "item_id": item_id,
            "model_version": model.version,
            "request_id": request_id(request),
            "items": items,
        }
    )


router.add_api_route(
    "/v1/items/{item_id}/similar",
    similar,
    methods=["GET"],
    route_class_override=FastSimilarRoute,
    tags=["recommendations"],
    summary="Items most similar to an item",
    response_model=SimilarItems,
    responses={404: err("The item is not in the served model."), **VALIDATION, **NO_MODEL, **URL_TOO_LONG},
)


@router.get("/healthz", tags=["ops"], summary="Liveness", response_model=Health)
async def healthz() -> Response:
    """Answers as soon as the process runs, model or not."""
    return JSON({"status": "ok"})


@router.get("/readyz", tags=["ops"], summary="Readiness", response_model=Readiness, responses=NO_MODEL)
async def readyz(request: Request) -> Response:
    """200 once a model is loaded, 503 (error shape) before."""
    model = served_model(request)
    return JSON({"status": "ready", "model_version": model.version})


@router.get(
    "/metrics",
    tags=["ops"],
    summary="Prometheus metrics",
    response_class=Response,
    responses={
        200: {"content": {"text/plain": {"schema": {"type": "string"}}}, "description": "Exposition text."}
    },
)
async def prometheus() -> Response:
    """Request count and latency per route template, served model version, events written, fallbacks;
    aggregated over all workers (Prometheus multiprocess mode) when started by `recsys serve`."""
    body, content_type = metrics.render()
    return Response(body, media_type=content_type)
