"""Catalogue routes: item and user attributes, hidden items, and the non-personalised lists.

`/v1/items/popular` and `/v1/items/latest` are declared before `/v1/items/{item_id}` so they are not
captured by it (an item whose id is literally `popular` or `latest` can be written but not read back by
GET). Both lists are read from the database at most once per LIST_TTL seconds per worker and window,
and the worker that answers a PUT of an item drops its cached lists at once.
"""

from __future__ import annotations

import json
import re
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Annotated, Any

from fastapi import APIRouter, Body, Query, Request, Response

from app.api.deps import VALIDATION, ItemIdPath, UserIdPath, err, request_id
from app.api.errors import ApiError
from app.api.jsonresp import JSON
from app.api.schemas import (
    MAX_ATTRIBUTES_BYTES,
    ItemIn,
    ItemOut,
    LatestItems,
    PopularItems,
    UserIn,
    UserOut,
)
from app.db.items import get_item, get_user, latest_items, popular_items, put_item, put_user

router = APIRouter(tags=["catalogue"])

LIST_TTL = 10.0  # seconds a popular/latest list is reused
LIST_MAX = 1000  # the lists are computed this deep once, then sliced to k
MAX_WINDOW = 3650 * 86400
_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
_WINDOW_RE = re.compile(r"^([1-9][0-9]{0,9})([smhdw]?)$")


class ListCache:
    """Small per-worker TTL cache of computed lists, keyed by window (popular) or a constant (latest)."""

    def __init__(self, ttl: float = LIST_TTL, size: int = 64) -> None:
        self.ttl, self.size = ttl, size
        self._entries: OrderedDict[Any, tuple[float, Any]] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: Any, compute: Callable[[], Any]) -> tuple[float, Any]:
        now = time.time()
        with self._lock:
            hit = self._entries.get(key)
            if hit is not None and now - hit[0] < self.ttl:
                return hit
        value = (now, compute())  # outside the lock: a slow query does not block other windows
        with self._lock:
            self._entries[key] = value
            self._entries.move_to_end(key)
            while len(self._entries) > self.size:
                self._entries.popitem(last=False)
        return value

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()


def _cache(request: Request) -> ListCache:
    state = request.app.state
    cache = getattr(state, "list_cache", None)
    if cache is None:
        cache = state.list_cache = ListCache()
    return cache


def parse_window(value: str) -> int:
    match = _WINDOW_RE.match(value)
    seconds = int(match.group(1)) * _UNITS[match.group(2)] if match else 0
    if not match or seconds > MAX_WINDOW:
        raise ApiError(
            422,
            "bad_window",
            f"window {value!r} is not a duration like 7d, 24h, 30m or 3600 (at most 3650d)",
            [{"loc": ["query", "window"], "msg": "bad duration", "type": "bad_window"}],
        )
    return seconds


K = Annotated[int, Query(ge=1, le=LIST_MAX, description="How many items to return (1–1000).", examples=[10])]


@router.get(
    "/v1/items/popular",
    summary="Most popular items in a recent window",
    response_model=PopularItems,
    responses=VALIDATION,
)
def popular(
    request: Request,
    k: K = 10,
    window: Annotated[
        str,
        Query(
            min_length=1,
            max_length=16,
            description="How far back to count positive events, by `events.timestamp`: a number with an "
            "optional unit `s`, `m`, `h`, `d` or `w` (plain number = seconds), at most 3650d. "
            "Anything else → 422 `bad_window`.",
            examples=["7d"],
        ),
    ] = "7d",
) -> Response:
    """Visible items ranked by their number of positive events (types not in RECSYS_NEGATIVE_TYPES) with
    a timestamp inside the window. Needs no model. Each worker computes a window's list at most every
    10 s (one grouped query over the events in the window, by the `events.timestamp` index)."""
    seconds = parse_window(window)
    state = request.app.state

    def compute() -> tuple[float, list[tuple[str, int]]]:
        since = time.time() - seconds
        with state.engine.connect() as conn:
            return since, popular_items(conn, since, state.settings.negative_types, LIST_MAX)

    computed_at, (since, rows) = _cache(request).get(("popular", seconds), compute)
    return JSON(
        {
            "window_seconds": seconds,
            "since": since,
            "computed_at": computed_at,
            "request_id": request_id(request),
            "items": [{"item_id": i, "count": n, "rank": r} for r, (i, n) in enumerate(rows[:k], 1)],
        }
    )


@router.get("/v1/items/latest", summary="Newest items", response_model=LatestItems, responses=VALIDATION)
def latest(request: Request, k: K = 10) -> Response:
    """Visible items by `created_at`, newest first (ties: the later-created row first). Needs no model;
    cached for 10 s per worker."""
    engine = request.app.state.engine

    def compute() -> list[tuple[str, str | None]]:
        with engine.connect() as conn:
            return latest_items(conn, LIST_MAX)

    computed_at, rows = _cache(request).get(("latest",), compute)
    return JSON(
        {
            "computed_at": computed_at,
            "request_id": request_id(request),
            "items": [{"item_id": i, "created_at": c, "rank": r} for r, (i, c) in enumerate(rows[:k], 1)],
        }
    )


MAX_DEPTH = 32
_INT64 = 2**63


def _bad_attributes(message: str) -> ApiError:
    return ApiError(
        422,
        "validation_error",
        f"attributes are not storable JSON: {message}",
        [{"loc": ["body", "attributes"], "msg": message, "type": "value_error"}],
    )


def _check_values(attributes: dict[str, Any]) -> None:
    """Integers must fit 64 bits (what JSON clients and the response encoder handle); nesting is bounded."""
    stack: list[tuple[Any, int]] = [(attributes, 1)]
    while stack:
        value, depth = stack.pop()
        if depth > MAX_DEPTH:
            raise _bad_attributes(f"nested deeper than {MAX_DEPTH} levels")
        if isinstance(value, dict):
            stack.extend((v, depth + 1) for v in value.values())
        elif isinstance(value, list):
            stack.extend((v, depth + 1) for v in value)
        elif isinstance(value, int) and not isinstance(value, bool) and not -_INT64 <= value < _INT64:
            raise _bad_attributes("integers must fit in 64 bits")


def _check_attributes(attributes: dict[str, Any] | None) -> None:
    if attributes is None:
        return
    _check_values(attributes)
    try:
        size = len(json.dumps(attributes, ensure_ascii=False, allow_nan=False).encode("utf-8"))
    except (ValueError, UnicodeEncodeError) as exc:  # NaN/Infinity, lone surrogates
        raise _bad_attributes(str(exc)) from exc
    if size > MAX_ATTRIBUTES_BYTES:
        raise ApiError(
            413,
            "attributes_too_large",
            f"attributes are {size} bytes of JSON; the limit is {MAX_ATTRIBUTES_BYTES}",
            {"size": size, "limit": MAX_ATTRIBUTES_BYTES},
        )


TOO_LARGE = {413: err("Attributes larger than 16 KiB of JSON (`attributes_too_large`), or a body over "
                      "RECSYS_MAX_BODY_BYTES (`payload_too_large`); nothing is stored.")}


@router.put(
    "/v1/items/{item_id}",
    summary="Create or update an item's attributes and hidden flag",
    response_model=ItemOut,
    responses={**TOO_LARGE, **VALIDATION},
)
def put_item_route(
    request: Request,
    item_id: ItemIdPath,
    body: Annotated[ItemIn, Body(description="Attributes and/or the hidden flag.")],
) -> Response:
    """Upsert: a new item is created. `hidden=true` takes the item out of recommendations, similar items,
    popular and latest lists at once on this worker (other workers: at their next poll, or
    `POST /admin/reload`). Category changes reach `category=` filters the same way."""
    _check_attributes(body.attributes)
    state = request.app.state
    with state.write_lock, state.engine.begin() as conn:
        put_item(conn, item_id, body.attributes, body.hidden)
        stored = get_item(conn, item_id)
    state.holder.apply_item(item_id, body.hidden, body.attributes)
    _cache(request).clear()
    return JSON(stored)


@router.get(
    "/v1/items/{item_id}",
    summary="An item's attributes and hidden flag",
    response_model=ItemOut,
    responses={404: err("No such item in the database (`unknown_item`)."), **VALIDATION},
)
def get_item_route(request: Request, item_id: ItemIdPath) -> Response:
    """Any item the database knows (written by PUT or by an event), whether or not the model serves it."""
    with request.app.state.engine.connect() as conn:
        stored = get_item(conn, item_id)
    if stored is None:
        raise ApiError(404, "unknown_item", f"item {item_id!r} is unknown")
    return JSON(stored)


@router.put(
    "/v1/users/{user_id}",
    summary="Create or update a user's attributes",
    response_model=UserOut,
    responses={**TOO_LARGE, **VALIDATION},
)
def put_user_route(
    request: Request,
    user_id: UserIdPath,
    body: Annotated[UserIn, Body(description="The user's attributes.")],
) -> Response:
    """Upsert: a new user is created."""
    _check_attributes(body.attributes)
    state = request.app.state
    with state.write_lock, state.engine.begin() as conn:
        put_user(conn, user_id, body.attributes)
        stored = get_user(conn, user_id)
    return JSON(stored)


@router.get(
    "/v1/users/{user_id}",
    summary="A user's attributes",
    response_model=UserOut,
    responses={404: err("No such user in the database (`unknown_user`)."), **VALIDATION},
)
def get_user_route(request: Request, user_id: UserIdPath) -> Response:
    """Any user the database knows (written by PUT or by an event)."""
    with request.app.state.engine.connect() as conn:
        stored = get_user(conn, user_id)
    if stored is None:
        raise ApiError(404, "unknown_user", f"user {user_id!r} is unknown")
    return JSON(stored)
