"""Event ingestion: ``POST /v1/events``, one event or a batch, acknowledged only after its commit."""

from __future__ import annotations

import time
from typing import Annotated

from fastapi import APIRouter, Body, Request, Response

from app.api import metrics
from app.api.deps import err
from app.api.errors import ApiError
from app.api.jsonresp import JSON
from app.api.schemas import EventIn, EventsAccepted
from app.db.events import insert_event_rows

router = APIRouter()


@router.post(
    "/v1/events",
    tags=["events"],
    summary="Record one event or a batch",
    response_model=EventsAccepted,
    responses={
        413: err("More events than RECSYS_MAX_BATCH_EVENTS (default 1000) in one request."),
        422: err("Malformed JSON or an invalid field (nothing is stored)."),
    },
)
def post_events(
    request: Request,
    body: Annotated[
        EventIn | list[EventIn],
        Body(
            description="One event object, or a JSON array of up to RECSYS_MAX_BATCH_EVENTS (default 1000)."
        ),
    ],
) -> Response:
    """All-or-nothing: the answer comes after the commit, so an acknowledged event survives a crash.
    Idempotent by `event_id`: retries are counted as `duplicates`. Unknown users and items are created."""
    events = body if isinstance(body, list) else [body]
    limit = request.app.state.settings.max_batch_events
    if len(events) > limit:
        raise ApiError(413, "batch_too_large", f"{len(events)} events in one request; the limit is {limit}")
    unique = list({e.event_id: e for e in reversed(events)}.values())[::-1]  # first occurrence wins
    accepted = 0
    if unique:
        now = time.time()
        rows = [
            {
                "event_id": e.event_id,
                "user_id": e.user_id,
                "item_id": e.item_id,
                "type": e.type,
                "value": e.value,
                "timestamp": now if e.timestamp is None else e.timestamp,
            }
            for e in unique
        ]
        # SQLite has one writer: queueing on a lock here beats its busy-timeout backoff (long sleeps).
        with request.app.state.write_lock, request.app.state.engine.begin() as conn:
            accepted = insert_event_rows(conn, rows)
        request.app.state.recent.add_local((e.user_id, e.item_id) for e in unique)
    metrics.EVENTS_WRITTEN.inc(accepted)
    metrics.EVENTS_DUPLICATE.inc(len(events) - accepted)
    return JSON({"received": len(events), "accepted": accepted, "duplicates": len(events) - accepted})
