"""Admin routes behind a bearer token: negatives inspection, the model registry, promotion, reload.

With RECSYS_ADMIN_TOKEN unset the routes answer 404 (as if absent), so an unconfigured
deployment exposes nothing; a missing or wrong token answers 401.
"""

from __future__ import annotations

import hmac
from datetime import datetime
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Path, Query, Request, Response, Security
from fastapi.concurrency import run_in_threadpool
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from app.api.deps import NO_MODEL, VALIDATION, UserIdPath, err, served_model
from app.api.errors import ApiError
from app.api.jsonresp import JSON
from app.api.schemas import ModelsResponse, NegativesResponse, ReloadResponse, RollbackResponse
from app.db import registry
from app.db.userdata import negative_feedback
from trainer.checkpoint import VERSION_RE, CheckpointError, read_manifest

bearer = HTTPBearer(auto_error=False, description="RECSYS_ADMIN_TOKEN")


def require_admin(
    request: Request, credentials: Annotated[HTTPAuthorizationCredentials | None, Security(bearer)]
) -> None:
    token = request.app.state.settings.admin_token
    if not token:
        raise ApiError(404, "admin_disabled", "admin routes are disabled (RECSYS_ADMIN_TOKEN is not set)")
    given = credentials.credentials if credentials else ""
    if not hmac.compare_digest(given.encode(), token.encode()):
        raise ApiError(401, "unauthorized", "missing or wrong bearer token")


AUTH = {
    401: err("Missing or wrong `Authorization: Bearer <RECSYS_ADMIN_TOKEN>`."),
    404: err("Admin routes are disabled (no token configured), or the user/version is unknown."),
}
router = APIRouter(prefix="/admin", tags=["admin"], dependencies=[Depends(require_admin)], responses=AUTH)

Version = Annotated[
    str, Path(min_length=1, max_length=128, pattern=VERSION_RE.pattern, description="Model version id.")
]


@router.get(
    "/users/{user_id}/negatives",
    summary="Negatives the sampler would draw for a user",
    response_model=NegativesResponse,
    responses={**VALIDATION, **NO_MODEL},
)
def negatives(
    request: Request,
    user_id: UserIdPath,
    strategy: Annotated[
        str,
        Query(
            min_length=1,
            max_length=32,
            pattern=r"^[a-z][a-z_-]*$",
            description="`trained`: what the served model was trained with, its sources blended as in "
            "training; `mixed`: its recorded blend; uniform, popularity, in-batch, hard or feedback: that "
            "source alone, with its recorded settings.",
            examples=["trained"],
        ),
    ] = "trained",
    n: Annotated[
        int,
        Query(
            ge=1,
            le=1000,
            description="How many negatives to show, split between the sources in the proportions training "
            "draws them (each source at least one).",
        ),
    ] = 20,
    seed: Annotated[
        int | None, Query(ge=0, le=2**32 - 1, description="Random seed, for repeatable draws.")
    ] = None,
) -> Response:
    """Draws with the trainer's own sampler (`make_sampler`, torch-free), built from the sampler
    configuration recorded in the served checkpoint's manifest, against the served model; the user's
    explicit negative feedback (RECSYS_NEGATIVE_TYPES) from the database is the feedback source. In-batch
    negatives are the positives of a simulated batch of the trained size, drawn by popularity."""
    model = served_model(request)
    try:
        from trainer.inspect_negatives import draw_negatives
    except ImportError as exc:
        raise ApiError(503, "unavailable", f"negative inspection is not available: {exc}") from exc
    with request.app.state.engine.connect() as conn:
        feedback = negative_feedback(conn, user_id, request.app.state.settings.negative_types)
    try:
        result = draw_negatives(model.ckpt, user_id, strategy, n, feedback_items=feedback, seed=seed)
    except KeyError as exc:
        raise ApiError(404, "unknown_user", f"user {user_id!r} is not in model {model.version}") from exc
    except ValueError as exc:
        raise ApiError(422, "bad_strategy", str(exc)) from exc
    return JSON(result)


def _iso(value: Any) -> str | None:
    return value.isoformat() if isinstance(value, datetime) else (str(value) if value is not None else None)


def _diagnostics(path: str) -> list[dict[str, Any]]:
    try:
        return list(read_manifest(path).get("diagnostics") or [])
    except CheckpointError:
        return []


@router.get("/models", summary="Registered model versions", response_model=ModelsResponse)
def models(request: Request) -> Response:
    """Every registered version with its metrics, the per-epoch sampling diagnostics from its manifest,
    and which one this worker serves."""
    holder = request.app.state.holder
    current = holder.current
    with request.app.state.engine.connect() as conn:
        rows = registry.list_versions(conn)
    out = [
        {
            **{k: row[k] for k in ("version", "path", "status", "watermark", "metrics")},
            "created_at": _iso(row["created_at"]),
            "promoted_at": _iso(row["promoted_at"]),
            "diagnostics": _diagnostics(row["path"]),
            "served": current is not None and current.version == row["version"],
        }
        for row in rows
    ]
    return JSON(
        {
            "served_version": current.version if current else None,
            "served_path": str(current.ckpt.path) if current else None,
            "refused": dict(holder.refused),
            "models": out,
        }
    )


@router.post(
    "/models/{version}/promote",
    summary="Promote a version and serve it",
    response_model=ReloadResponse,
    responses={409: err("The checkpoint failed to load; nothing was promoted.")},
)
async def promote(request: Request, version: Version) -> Response:
    """Loads the checkpoint first (a corrupt one is refused and nothing changes), then marks it promoted
    and swaps it in on this worker; other workers follow within RECSYS_RELOAD_POLL_SECONDS. A version
    present under the checkpoints directory but not yet registered is registered on the way."""
    return JSON(await promote_version(request.app.state, version))


async def promote_version(state: Any, version: str) -> dict[str, Any]:
    """The promotion behind POST /admin/models/{version}/promote (and the dashboard's): raises ApiError."""
    holder = state.holder

    def _find() -> dict[str, Any] | None:
        with state.engine.connect() as conn:
            return registry.get_version(conn, version)

    row = await run_in_threadpool(_find)
    if row is not None:
        path = holder.registry_path(row)
    elif (state.settings.checkpoints_path / version).is_dir():
        path = state.settings.checkpoints_path / version
    else:
        raise ApiError(404, "unknown_version", f"model version {version!r} is neither registered nor on disk")
    try:
        model = await run_in_threadpool(holder.load, path.resolve())
    except CheckpointError as exc:
        raise ApiError(409, "checkpoint_refused", str(exc)) from exc
    if model.version != version:
        raise ApiError(409, "checkpoint_refused", f"{path} holds version {model.version}, not {version}")

    def _promote() -> None:
        with state.engine.begin() as conn:
            if row is None:
                registry.register(
                    conn,
                    version,
                    str(path.resolve()),
                    watermark=model.ckpt.watermark,
                    metrics=model.ckpt.manifest.get("metrics") or {},
                )
            registry.promote(conn, version)

    await run_in_threadpool(_promote)
    old = holder.current
    holder.swap(model)
    return {
        "model_version": model.version,
        "changed": old is None or old.version != model.version,
        "load_seconds": round(model.load_seconds, 4),
    }


@router.post(
    "/models/rollback",
    summary="Serve the version promoted before the current one",
    response_model=RollbackResponse,
    responses={
        409: err(
            "Nothing to roll back to (`nothing_to_roll_back`), or its checkpoint failed to load "
            "(`checkpoint_refused`); nothing changed."
        )
    },
)
async def rollback(request: Request) -> Response:
    """What `recsys models rollback` does (the same registry function, one transaction): the version
    promoted before the current one is promoted again and the current one marked `rejected`. Its checkpoint
    is loaded first (a broken one changes nothing) and served on this worker; other workers follow within
    RECSYS_RELOAD_POLL_SECONDS."""
    return JSON(await rollback_version(request.app.state))


async def rollback_version(state: Any) -> dict[str, Any]:
    """The roll-back behind POST /admin/models/rollback (and the dashboard's): raises ApiError."""
    holder = state.holder

    def _target() -> dict[str, Any]:
        with state.engine.connect() as conn:
            row = registry.get_version(conn, registry.rollback_plan(conn)[1])
        assert row is not None
        return row

    def _rollback(to: str) -> str:
        with state.engine.begin() as conn:
            return registry.rollback(conn, to=to)[0]

    try:
        target = await run_in_threadpool(_target)
        model = await run_in_threadpool(holder.load, holder.registry_path(target).resolve())
        if model.version != target["version"]:
            raise CheckpointError(f"{target['path']} holds version {model.version}, not {target['version']}")
        rejected = await run_in_threadpool(_rollback, target["version"])
    except registry.RegistryError as exc:
        raise ApiError(409, "nothing_to_roll_back", str(exc)) from exc
    except CheckpointError as exc:
        raise ApiError(409, "checkpoint_refused", str(exc)) from exc
    old = holder.current
    holder.swap(model)
    return {
        "model_version": model.version,
        "rejected_version": rejected,
        "changed": old is None or old.version != model.version,
        "load_seconds": round(model.load_seconds, 4),
    }


@router.post(
    "/reload",
    summary="Look for a newly promoted model now",
    response_model=ReloadResponse,
    responses={409: err("The target checkpoint failed to load; the old model keeps serving.")},
)
async def reload(request: Request) -> Response:
    """What the poller does every RECSYS_RELOAD_POLL_SECONDS, on demand and on this worker; a previously
    refused checkpoint is retried."""
    result = await run_in_threadpool(request.app.state.holder.refresh, True)
    if result.error:
        raise ApiError(
            409,
            "checkpoint_refused",
            result.error,
            {"served_version": result.model.version if result.model else None},
        )
    assert result.model is not None
    return JSON(
        {
            "model_version": result.model.version,
            "changed": result.changed,
            "load_seconds": round(result.model.load_seconds, 4) if result.changed else None,
        }
    )
