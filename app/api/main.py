"""The app factory: wires settings, database, model holder, impression writer and routes.

Start-up refuses a stale schema (SchemaError with the fix command), then loads the model in a
thread so /healthz answers at once and /readyz turns 200 when the model is in. A poller follows
newly promoted versions every RECSYS_RELOAD_POLL_SECONDS. On SQLite a thread checkpoints the WAL, so no
event commit does (app/db/wal.py). Shutdown commits the queued events and drains
the impression queue.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import os
from collections.abc import AsyncIterator
from pathlib import Path

from fastapi import FastAPI
from fastapi.concurrency import run_in_threadpool
from sqlalchemy import Engine

from app.api import admin, catalog, errors, events, logs, metrics, routes
from app.api.body_limit import BodyLimit
from app.api.ingest import GroupCommitter
from app.api.middleware import RequestContext
from app.api.recent import RecentEventsView
from app.dashboard import install as install_dashboard
from app.db.impressions import ImpressionWriter
from app.db.lock import SqliteWriteLock
from app.db.migrate import checked_engine
from app.db.wal import WalCheckpointer
from app.serving.checkpoints import resolve_checkpoint
from app.serving.holder import ModelHolder
from app.serving.model import open_checkpoint
from app.serving.recommender import Recommender
from app.settings import Settings, get_settings
from trainer.checkpoint import CheckpointError

CHECKPOINT_ENV = "RECSYS_SERVE_CHECKPOINT"
IMPRESSION_BATCH = 100  # served lists per impressions transaction at most
log = logging.getLogger("recsys.api")

TAGS = [
    {"name": "recommendations", "description": "Ranked items for users and items."},
    {"name": "events", "description": "Interaction and feedback ingestion (idempotent)."},
    {
        "name": "catalogue",
        "description": "Item and user attributes, hidden items, popular and latest items (no model needed).",
    },
    {"name": "admin", "description": "Bearer-token protected: negatives, models, promotion, reload."},
    {"name": "ops", "description": "Health, readiness and Prometheus metrics."},
]


async def _poll(app: FastAPI, every: float) -> None:
    holder: ModelHolder = app.state.holder
    while True:
        await asyncio.sleep(every)
        try:
            await run_in_threadpool(holder.refresh)
        except Exception:  # the poller must survive a database hiccup
            log.exception("model poll failed")


async def _initial_load(app: FastAPI) -> None:
    try:
        result = await run_in_threadpool(app.state.holder.refresh)
    except Exception:  # the poller keeps trying; /readyz stays 503 meanwhile
        log.exception("model load at start-up failed")
        return
    if result.model is None:
        log.error("no model loaded at start-up", extra={"reason": result.error})


def _freeze_heap(_model: object) -> None:
    """Move everything alive now (a loaded model is ~170k long-lived objects) out of the cyclic GC's reach.

    A full collection over them took ~100 ms, stalling the event loop: the p99 of recommendations at 2
    workers × 16 connections went from ~8 ms to ~70 ms in the runs where one struck (bench/serve.py).
    Frozen objects are still freed by reference counting when a swap drops the old model.
    """
    gc.freeze()


def _observe_checkpoint(kind: str, seconds: float, frames: int) -> None:
    metrics.SQLITE_CHECKPOINT_SECONDS.labels(kind).observe(seconds)
    metrics.SQLITE_WAL_FRAMES.set(frames)


def _checkpointer(engine: Engine, write_lock: SqliteWriteLock) -> WalCheckpointer:
    checkpointer = WalCheckpointer(engine, write_lock, observe=_observe_checkpoint)
    checkpointer.start()
    return checkpointer


def _pinned_checkpoint() -> Path | None:
    """The checkpoint named by RECSYS_SERVE_CHECKPOINT (a version directory, or a root: its newest valid
    version), checked as a load would check it. One that cannot be served stops start-up with the reason,
    rather than a worker that never becomes ready."""
    named = os.environ.get(CHECKPOINT_ENV)
    if not named:
        return None
    try:
        path = resolve_checkpoint(Path(named))
        open_checkpoint(path)
    except CheckpointError as exc:
        log.error("the pinned checkpoint cannot be served", extra={"checkpoint": named, "reason": str(exc)})
        raise
    return path


@contextlib.asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    settings: Settings = app.state.settings
    # raises SchemaError on a stale schema; on SQLite no commit checkpoints the WAL: _checkpointer does
    engine = checked_engine(settings.sqlalchemy_url, autocheckpoint=False)
    pinned = _pinned_checkpoint()
    app.state.engine = engine
    sqlite = engine.dialect.name == "sqlite"
    app.state.write_lock = (
        SqliteWriteLock(engine.url.database or "recsys.db") if sqlite else contextlib.nullcontext()
    )
    checkpointer = _checkpointer(engine, app.state.write_lock) if sqlite else None
    app.state.holder = ModelHolder(
        engine,
        settings.checkpoints_path,
        pinned,
        index_cache=settings.data_dir / "index-cache",
        top_n=settings.top_lists,
    )
    # Small, frequent batches: the writer holds the GIL while it builds a batch's rows, and 500 lists at
    # once stalled the event loop enough to triple p99 of recommendations (bench/serve.py, 2 workers, c=16).
    app.state.impressions = ImpressionWriter(
        engine, write_lock=app.state.write_lock, batch=IMPRESSION_BATCH, interval=0.1
    )
    app.state.impressions.start()
    app.state.recent = RecentEventsView(engine, negative_types=settings.negative_types)
    app.state.ingest = GroupCommitter(
        engine,
        app.state.write_lock,
        max_queue=settings.events_queue_max,
        max_group=settings.events_group_max,
        max_wait=settings.events_max_wait_seconds,
        on_commit=app.state.recent.add_committed,
    )
    app.state.ingest.start()
    app.state.recommender = Recommender(
        engine, settings.negative_types, recent=app.state.recent, fresh_weight=settings.fresh_weight
    )
    app.state.holder.on_swap.append(lambda model: app.state.recent.follow(model.watermark))
    app.state.holder.on_swap.append(_freeze_heap)
    app.state.recent.start()
    tasks = [asyncio.create_task(_initial_load(app))]
    if settings.reload_poll_seconds > 0:
        tasks.append(asyncio.create_task(_poll(app, settings.reload_poll_seconds)))
    try:
        yield
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await app.state.ingest.aclose()
        await run_in_threadpool(app.state.impressions.close)
        await run_in_threadpool(app.state.recent.close)
        if checkpointer is not None:
            await run_in_threadpool(checkpointer.close)
        engine.dispose()


def create_app(settings: Settings | None = None) -> FastAPI:
    """Build the ASGI app (used by uvicorn with ``--factory``)."""
    settings = settings or get_settings()
    logs.configure(settings.log_level)
    app = FastAPI(
        title="recsys",
        version="1",
        summary="Recommendations from embeddings trained with popularity-corrected and hard negatives.",
        description='Errors always have the shape `{"error": {"code", "message", "details"}}`.',
        openapi_tags=TAGS,
        lifespan=lifespan,
    )
    app.state.settings = settings
    app.state.list_cache = catalog.ListCache()
    errors.install(app)
    app.include_router(events.router)  # first: the busiest route, and routes are matched in order
    app.include_router(catalog.router)  # before routes: /v1/items/popular before /v1/items/{item_id}
    app.include_router(routes.router)
    app.include_router(admin.router)
    install_dashboard(app)
    app.add_middleware(BodyLimit, max_bytes=settings.max_body_bytes)
    app.add_middleware(RequestContext)  # outside BodyLimit: its 413s are logged and counted too
    return app
