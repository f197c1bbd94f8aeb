"""A bound on request bodies, answered in the API's error shape.

The service reads every body whole (`POST /v1/events`, the catalogue's PUTs, the dashboard's forms), so
without a bound one request could fill a worker's memory. Starlette's and FastAPI's own limit
(``max_body_size``) answers a body whose declared length is too large with a plain-text 413 that
replaces whatever the app sends, which would break the one error shape every 4xx carries
(app/api/errors.py); this one answers ``payload_too_large`` in that shape. A declared length is checked
before anything is read; a chunked body is counted as it arrives. A body without either is empty.
"""

from __future__ import annotations

from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.api.errors import error_body
from app.api.jsonresp import JSON


def _too_large(limit: int) -> str:
    return f"the request body is larger than {limit} bytes (RECSYS_MAX_BODY_BYTES)"


def _framing(scope: Scope) -> tuple[int | None, bool]:
    """The declared Content-Length (None when absent or unreadable) and whether the body is chunked."""
    length, chunked = None, False
    for name, value in scope.get("headers", ()):
        if name == b"content-length":
            length = int(value) if value.isdigit() else None
        elif name == b"transfer-encoding":
            chunked = b"chunked" in value.lower()
    return length, chunked


class BodyLimit:
    """413 ``payload_too_large`` for a body over ``max_bytes``, before it is read into memory."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        length, chunked = _framing(scope)
        if length is not None and length > self.max_bytes:
            await JSON(error_body("payload_too_large", _too_large(self.max_bytes)), status_code=413)(scope, receive, send)
            return
        if not chunked:  # the server delivers at most the declared length
            await self.app(scope, receive, send)
            return
        seen = 0

        async def counted() -> Message:
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.max_bytes:  # an HTTPException: body parsing re-raises it, the app's handler shapes it
                raise HTTPException(413, _too_large(self.max_bytes))
            return message

        await self.app(scope, counted, send)
