"""Every call the dashboard makes into the service, in one place: recommendations, similar items,
negatives, promotion and roll-back.

The dashboard shows what the API would answer, through the API's own code: the recommendation and
similar-items handlers, the admin negatives handler, the admin promotion and the registry's roll-back
plan (the one `recsys models rollback` follows). When that code moves, only this module follows it.
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import numpy as np
import orjson
from fastapi import Request

from app.api import admin, routes
from app.api.errors import ApiError
from app.db import registry

STRATEGIES = ("trained", "uniform", "popularity", "in-batch", "hard", "mixed", "feedback")
FALLBACK_STRATEGY = "mixed"  # drawn when the negatives endpoint does not offer the one asked for


class _NoImpressions:
    """Stands in for the impression writer: a list an operator looks at was not shown to the user, and
    logging it would teach the trainer that the user ignored it."""

    def submit(self, _served: object) -> bool:
        return True


class _StateView:
    def __init__(self, state: Any) -> None:
        self._state = state
        self.impressions = _NoImpressions()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._state, name)


def _unlogged(request: Request) -> Request:
    """The dashboard request as the public handlers see it, minus impression logging."""
    scope = dict(request.scope, app=SimpleNamespace(state=_StateView(request.app.state)))
    return Request(scope)


def _body(response: Any) -> dict[str, Any]:
    return orjson.loads(response.body)


def recommendations(request: Request, user_id: str, k: int = 10) -> dict[str, Any]:
    """What GET /v1/users/{id}/recommendations?explain=true answers now (not logged as an impression)."""
    return _body(
        routes.recommendations(
            _unlogged(request), user_id, k=k, exclude_seen=True, exclude=None, only=None, category=None,
            explain=True,
        )
    )


def similar(request: Request, item_id: str, k: int = 10) -> dict[str, Any]:
    """What GET /v1/items/{id}/similar answers now."""
    return _body(routes.similar(request, item_id, k=k, exclude=None, only=None, category=None))


def negatives(request: Request, user_id: str, strategy: str, n: int, seed: int | None) -> dict[str, Any]:
    """What GET /admin/users/{id}/negatives answers. A strategy the endpoint does not offer (``trained``
    before it exists there) falls back to FALLBACK_STRATEGY, with ``fallback_from`` saying so."""
    try:
        return _body(admin.negatives(request, user_id, strategy=strategy, n=n, seed=seed))
    except ApiError as exc:
        if exc.code != "bad_strategy" or strategy == FALLBACK_STRATEGY:
            raise
        out = _body(admin.negatives(request, user_id, strategy=FALLBACK_STRATEGY, n=n, seed=seed))
        return {**out, "fallback_from": strategy, "fallback_reason": exc.message}


def positive_scores(request: Request, user_id: str) -> np.ndarray:
    """Scores of the user's trained-on positives under the served model, as the negatives' are scored
    (dot product of the checkpoint's embeddings)."""
    model = request.app.state.holder.current
    row = model.user_row(user_id) if model is not None else None
    if row is None:
        return np.zeros(0, dtype=np.float32)
    rows = model.positive_rows(row)
    ckpt = model.ckpt
    return np.asarray(ckpt.item_embeddings[np.sort(rows)], np.float32) @ np.asarray(
        ckpt.user_embeddings[row], np.float32
    )


async def promote(request: Request, version: str) -> dict[str, Any]:
    """POST /admin/models/{version}/promote: load, mark promoted, serve."""
    return await admin.promote_version(request.app.state, version)


def rollback_plan(request: Request) -> tuple[str, str]:
    """(current, previous) promoted versions, as `recsys models rollback` picks them (ValueError: none)."""
    with request.app.state.engine.connect() as conn:
        return registry.rollback_plan(conn)


async def rollback(request: Request) -> dict[str, Any]:
    """POST /admin/models/rollback, as `recsys models rollback` (one registry transaction): serve the
    previously promoted version and mark the one rolled back from rejected."""
    result = await admin.rollback_version(request.app.state)
    return {**result, "rolled_back_from": result["rejected_version"]}
