"""Model versions: the list, a version's page with its per-epoch charts, and promotion and roll-back, each
behind a confirmation page whose POST carries the CSRF token."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fastapi import APIRouter, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import Response

from app.api.errors import ApiError
from app.dashboard import diagnostics, service
from app.dashboard.pages import compare, field, with_metrics
from app.dashboard.web import PREFIX, CheckedSession, Session, page, redirect
from app.db import registry
from trainer.checkpoint import VERSION_RE, CheckpointError, read_manifest

router = APIRouter(prefix=PREFIX, include_in_schema=False)


def _rows(request: Request) -> list[dict[str, Any]]:
    with request.app.state.engine.connect() as conn:
        return registry.list_versions(conn)


def _plan(request: Request) -> tuple[tuple[str, str] | None, str | None]:
    try:
        return service.rollback_plan(request), None
    except ValueError as exc:
        return None, str(exc)


def _served_version(request: Request) -> str | None:
    model = request.app.state.holder.current
    return model.version if model is not None else None


@router.get("/models")
async def models_page(request: Request, session: Session, done: str | None = None) -> Response:
    holder = request.app.state.holder
    rows = [{**with_metrics(r), "on_disk": holder.registry_path(r).is_dir()} for r in await run_in_threadpool(_rows, request)]
    plan, _ = await run_in_threadpool(_plan, request)
    return page(request, "models.html", {"rows": rows, "served": _served_version(request), "plan": plan,
                                         "refused": dict(holder.refused), "done": done})


def _version(request: Request, version: str) -> tuple[dict[str, Any] | None, dict[str, Any] | None, str | None]:
    """(registry row, manifest, why the manifest could not be read)."""
    with request.app.state.engine.connect() as conn:
        row = registry.get_version(conn, version)
    holder = request.app.state.holder
    path = holder.registry_path(row) if row else request.app.state.settings.checkpoints_path / version
    try:
        return row, read_manifest(Path(path)), None
    except CheckpointError as exc:
        return row, None, str(exc)


def _known(request: Request, version: str) -> tuple[dict | None, dict | None, str | None] | None:
    if not VERSION_RE.match(version) or len(version) > 128:
        return None
    row, manifest, error = _version(request, version)
    return None if row is None and manifest is None else (row, manifest, error)


def _missing(request: Request, version: str) -> Response:
    message = f"No model version {version!r} is registered or under the checkpoints directory."
    return page(request, "message.html", {"title": "Not found", "message": message}, status=404)


@router.get("/rollback")
async def rollback_confirm(request: Request, session: Session) -> Response:
    plan, reason = await run_in_threadpool(_plan, request)
    return page(request, "confirm.html", {"action": "rollback", "plan": plan, "reason": reason,
                                          "served": _served_version(request)})


@router.post("/rollback")
async def rollback(request: Request, session: CheckedSession) -> Response:
    try:
        result = await service.rollback(request)
    except ValueError as exc:
        return page(request, "message.html", {"title": "Nothing to roll back", "message": str(exc)}, status=409)
    except ApiError as exc:
        return page(request, "message.html", {"title": "Roll-back refused", "message": exc.message},
                    status=exc.status)
    return redirect(f"{PREFIX}/models/{result['model_version']}?done=rolled-back")


def _version_context(request: Request, version: str, row: dict | None, manifest: dict | None) -> dict:
    manifest = manifest or {}
    metrics = field(row, "metrics") or field(manifest, "metrics")
    diag = manifest.get("diagnostics") or []
    columns, epochs = diagnostics.table(diag)
    source_columns, sources = diagnostics.source_table(diag)
    config = field(manifest, "config")
    return {
        "version": version, "row": row, "manifest": manifest, "metrics": metrics, "compare": compare(metrics),
        "gate": field(metrics, "gate"), "config": config, "sampler": field(config, "sampler"),
        "charts": diagnostics.charts(diag), "columns": columns, "epochs": epochs,
        "source_columns": source_columns, "sources": sources, "served": _served_version(request),
    }


@router.get("/models/{version}")
async def version_page(request: Request, session: Session, version: str, done: str | None = None) -> Response:
    found = await run_in_threadpool(_known, request, version)
    if found is None:
        return _missing(request, version)
    row, manifest, error = found
    plan, _ = await run_in_threadpool(_plan, request)
    context = _version_context(request, version, row, manifest)
    return page(request, "version.html", {**context, "manifest_error": error, "plan": plan, "done": done})


@router.get("/models/{version}/promote")
async def promote_confirm(request: Request, session: Session, version: str) -> Response:
    found = await run_in_threadpool(_known, request, version)
    if found is None:
        return _missing(request, version)
    row, manifest, error = found
    served = request.app.state.holder.current
    current = compare(served.ckpt.manifest.get("metrics")) if served else []
    return page(request, "confirm.html", {
        "action": "promote", "version": version, "row": row, "manifest_error": error,
        "candidate": compare(field(row, "metrics") or field(manifest, "metrics")),
        "current": current, "served": _served_version(request),
    })


@router.post("/models/{version}/promote")
async def promote(request: Request, session: CheckedSession, version: str) -> Response:
    if not VERSION_RE.match(version) or len(version) > 128:
        return _missing(request, version)
    try:
        await service.promote(request, version)
    except ApiError as exc:
        return page(request, "message.html", {"title": "Promotion refused", "message": exc.message},
                    status=exc.status)
    return redirect(f"{PREFIX}/models/{version}?done=promoted")
