"""Public routes: recommendations, similar items, health, readiness and metrics (events: app.api.events).

The routes parse and validate; the answer is the serving core's (app.serving.recommender). Handlers that
touch FAISS or the database are plain ``def``: FastAPI runs them in its threadpool, keeping the event loop
free (FAISS and the DB drivers release the GIL while they work). The common recommendation (a known user,
no filters, seen items known in memory, a cheap search) is answered on the event loop by
``FastRecommendationsRoute`` instead, through the same core: measured in bench/serve.py, the threadpool
hop and FastAPI's per-request parameter handling cost several times the work itself, which is a walk
down the user's precomputed list (app.serving.toplists) or, before it is built, one cheap search.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated

import orjson
from fastapi import APIRouter, Query, Request, Response
from fastapi.routing import APIRoute
from pydantic import StringConstraints
from starlette.types import Receive, Scope, Send

from app.api import metrics
from app.api.deps import NO_MODEL, VALIDATION, ItemIdPath, UserIdPath, err, request_id, served_model
from app.api.errors import ApiError
from app.api.jsonresp import JSON
from app.api.schemas import (
    Health,
    Readiness,
    Recommendations,
    SimilarItems,
    _printable,
)
from app.serving.model import ServedModel
from app.serving.recommender import Ask, UnknownItem

router = APIRouter()

URL_TOO_LONG = {
    400: {
        "description": "Request line over 64 KiB (e.g. very long `exclude`/`only` lists): refused by the "
        "HTTP server itself, with a plain-text body, before the application sees it.",
        "content": {"text/plain": {"schema": {"type": "string"}}},
    }
}
K = Annotated[int, Query(ge=1, le=1000, description="How many items to return (1–1000).", examples=[10])]
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


TRUE = frozenset((b"1", b"on", b"t", b"true", b"y", b"yes"))  # pydantic's lax booleans
FALSE = frozenset((b"0", b"off", b"f", b"false", b"n", b"no"))
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


def _request_id(scope: Scope) -> str:
    return str(scope.get("state", {}).get("request_id", ""))


def fast_recommendations(scope: Scope) -> bytes | None:
    """The response body for a plain recommendation, or None when the full handler must answer.

    The serving core answers on the event loop what needs neither the database nor a costly search (a
    model user whose events since the watermark the in-memory view knows, no filters, no explain); only
    the parameter parsing and the thread hop are skipped, so the body, the impression and the metrics are
    the full handler's.
    """
    if scope["method"] != "GET":
        return None
    state = scope["app"].state
    model: ServedModel | None = state.holder.current
    params = _fast_params(scope["query_string"])
    user_id = _plain_id(scope, "user_id")
    if model is None or params is None or user_id is None:
        return None  # 503 or a validation error from the full handler
    rid = _request_id(scope)
    answer = state.recommender.recommend(
        model, Ask(user_id, *params), rid, impressions=state.impressions, on_loop=True
    )
    return None if answer is None else orjson.dumps(answer.body(rid))


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
    state = scope["app"].state
    model: ServedModel | None = state.holder.current
    params = _fast_params(scope["query_string"])
    item_id = _plain_id(scope, "item_id")
    if model is None or params is None or item_id is None:
        return None
    answer = state.recommender.similar(model, item_id, params[0], on_loop=True)
    return None if answer is None else orjson.dumps(answer.body(_request_id(scope)))


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
    ask = Ask(
        user_id,
        k,
        exclude_seen,
        _split_ids("exclude", exclude) or (),
        _split_ids("only", only),
        category,
        explain,
    )
    rid, state = request_id(request), request.app.state
    answer = state.recommender.recommend(served_model(request), ask, rid, impressions=state.impressions)
    assert answer is not None  # None only on the event loop
    return JSON(answer.body(rid))


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
    recommender = request.app.state.recommender
    filters = recommender.filters(model, _split_ids("exclude", exclude) or (), _split_ids("only", only), category)
    try:
        answer = recommender.similar(model, item_id, k, filters)
    except UnknownItem:
        raise ApiError(404, "unknown_item", f"item {item_id!r} is not in model {model.version}") from None
    return JSON(answer.body(request_id(request)))


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
