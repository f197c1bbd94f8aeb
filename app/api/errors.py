"""One error shape for every 4xx/5xx: ``{"error": {"code", "message", "details"}}``.

Clients branch on ``code`` (stable, snake_case), humans read ``message``; ``details`` carries the
per-field validation errors. Framework errors (unknown route, bad JSON, 405) are mapped too.
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from sqlalchemy.exc import SQLAlchemyError
from starlette.exceptions import HTTPException as StarletteHTTPException

from app.api.jsonresp import JSON
from app.db.engine import unavailable

log = logging.getLogger("recsys.errors")

STATUS_CODES = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    409: "conflict",
    413: "payload_too_large",
    415: "unsupported_media_type",
    422: "validation_error",
    500: "internal_error",
    503: "unavailable",
}


class ApiError(Exception):
    """Raise from a route to answer with the error shape."""

    def __init__(self, status: int, code: str, message: str, details: Any = None) -> None:
        super().__init__(message)
        self.status, self.code, self.message, self.details = status, code, message, details


def error_body(code: str, message: str, details: Any = None) -> dict[str, Any]:
    return {"error": {"code": code, "message": message, "details": details}}


def _respond(status: int, code: str, message: str, details: Any = None, headers: Any = None) -> JSON:
    return JSON(error_body(code, message, details), status_code=status, headers=headers)


def _clean_validation(errors: list[Any]) -> list[dict[str, Any]]:
    """Pydantic errors without the raw input or exception objects (they may not be JSON-serialisable)."""
    out = []
    for err in errors:
        item = {"loc": list(err.get("loc", ())), "msg": str(err.get("msg", "")), "type": err.get("type", "")}
        out.append(item)
    return out


def install(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def _api_error(_: Request, exc: ApiError) -> JSON:
        headers = {"WWW-Authenticate": "Bearer"} if exc.status == 401 else None
        return _respond(exc.status, exc.code, exc.message, exc.details, headers)

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError) -> JSON:
        errors = _clean_validation(list(exc.errors()))
        if any(e["type"] == "json_invalid" for e in errors):
            return _respond(422, "malformed_json", "request body is not valid JSON", errors)
        return _respond(422, "validation_error", "request failed validation", errors)

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSON:
        if exc.status_code == 400 and exc.detail == "There was an error parsing the body":
            return _respond(422, "malformed_json", "request body is not valid JSON (or not UTF-8)", None)
        code = STATUS_CODES.get(exc.status_code, "http_error")
        message = exc.detail if isinstance(exc.detail, str) else code.replace("_", " ")
        return _respond(exc.status_code, code, message, None, getattr(exc, "headers", None))

    @app.exception_handler(SQLAlchemyError)
    async def _database(_: Request, exc: SQLAlchemyError) -> JSON:
        """Any route that reads the database while it is away: 503, retry later. A handler of its own, not
        the catch-all below: Starlette answers those from outside the middleware and re-raises, so the
        access log and metrics counted a 500 and uvicorn closed the connection, and a client's next
        request on it failed with a reset instead of its own 503."""
        if unavailable(exc):
            log.warning("database unavailable: %s", type(exc).__name__)
            return _respond(503, "database_unavailable", "the database is unavailable; retry shortly", None,
                            {"Retry-After": "1"})
        log.exception("database error")
        return _respond(500, "internal_error", "internal server error", None)

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception) -> JSON:
        log.exception("unhandled error")
        return _respond(500, "internal_error", "internal server error", None)
