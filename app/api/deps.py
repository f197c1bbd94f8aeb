"""Shared route plumbing: the served model, the engine, and the documented error responses."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import Path, Request
from pydantic import AfterValidator

from app.api.errors import ApiError
from app.api.schemas import ErrorResponse, _printable
from app.serving.model import ServedModel

UserIdPath = Annotated[
    str,
    Path(
        min_length=1,
        max_length=256,
        description="External user id (1–256 printable characters).",
        examples=["u1"],
    ),
    AfterValidator(_printable),
]
ItemIdPath = Annotated[
    str,
    Path(
        min_length=1,
        max_length=256,
        description="External item id (1–256 printable characters).",
        examples=["i42"],
    ),
    AfterValidator(_printable),
]


def err(description: str) -> dict[str, Any]:
    return {"model": ErrorResponse, "description": description}


VALIDATION = {422: err("Invalid parameters or body (error shape with per-field details).")}
NO_MODEL = {503: err("No model loaded yet (start-up, or no valid checkpoint).")}


def served_model(request: Request) -> ServedModel:
    """The model for this request, read once: a swap during the request does not affect it."""
    model = request.app.state.holder.current
    if model is None:
        raise ApiError(503, "no_model", "no model is loaded yet; see GET /readyz")
    return model


def request_id(request: Request) -> str:
    return str(request.scope.get("state", {}).get("request_id", ""))
