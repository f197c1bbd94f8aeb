"""The dashboard's plumbing: templates, page responses with their security headers, and the guards every
route goes through (dashboard on, signed in, CSRF token and same origin on every POST)."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import quote, urlsplit

from fastapi import Depends, Form, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from fastapi.templating import Jinja2Templates
from sqlalchemy.exc import SQLAlchemyError

from app.api.errors import ApiError
from app.dashboard import auth
from app.dashboard.traffic import Traffic
from app.db.engine import unavailable

HERE = Path(__file__).parent
PREFIX = "/dashboard"
HEADERS = {
    "Content-Security-Policy": "default-src 'none'; style-src 'self'; script-src 'self'; img-src 'self'; "
    "form-action 'self'; frame-ancestors 'none'; base-uri 'none'",
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}


@dataclass
class DashboardState:
    """Per-worker dashboard state (app.state.dashboard)."""

    limiter: auth.LoginLimiter = field(default_factory=auth.LoginLimiter)
    revoked: auth.Revoked = field(default_factory=auth.Revoked)
    traffic: Traffic = field(default_factory=Traffic)
    cache: dict[str, tuple[float, Any]] = field(default_factory=dict)

    def cached(self, key: str, seconds: float, compute: Any) -> Any:
        """``compute()``, reused for ``seconds`` (counts over a large log are not free)."""
        hit = self.cache.get(key)
        if hit is not None and hit[0] > time.monotonic():
            return hit[1]
        value = compute()
        self.cache[key] = (time.monotonic() + seconds, value)
        return value


def _ts(value: Any) -> str:
    """Epoch seconds or a datetime (or its ISO text) as 'YYYY-MM-DD HH:MM UTC'."""
    if value is None or value == "":
        return "—"
    try:
        if isinstance(value, int | float):
            moment = datetime.fromtimestamp(float(value), UTC)
        elif isinstance(value, datetime):
            moment = value if value.tzinfo else value.replace(tzinfo=UTC)
        else:
            moment = datetime.fromisoformat(str(value).replace("Z", "+00:00"))
            moment = moment if moment.tzinfo else moment.replace(tzinfo=UTC)
    except (ValueError, OverflowError, OSError):
        return str(value)
    return moment.astimezone(UTC).strftime("%Y-%m-%d %H:%M UTC")


def _num(value: Any, digits: int = 4) -> str:
    if value is None or value == "":
        return "—"
    if isinstance(value, bool) or not isinstance(value, int | float):
        return str(value)
    if isinstance(value, int):
        return f"{value:,}"
    return f"{value:,.{digits}f}" if abs(value) < 1e6 else f"{value:,.0f}"


def _pct(value: Any) -> str:
    return "—" if not isinstance(value, int | float) else f"{100 * value:.1f}%"


templates = Jinja2Templates(directory=str(HERE / "templates"))
templates.env.filters.update(ts=_ts, num=_num, pct=_pct, q=lambda s: quote(str(s), safe=""))


def page(request: Request, name: str, context: dict[str, Any], status: int = 200) -> HTMLResponse:
    """A rendered template with the dashboard's headers and, when signed in, the form token."""
    session: auth.Session | None = getattr(request.state, "dashboard_session", None)
    token = request.app.state.settings.admin_token
    context = {
        "session": session,
        "csrf": auth.csrf_token(token, session.sid) if session else None,
        "path": request.url.path,
        **context,
    }
    response = templates.TemplateResponse(request, name, context, status_code=status)
    response.headers.update(HEADERS)
    return response


def redirect(url: str) -> RedirectResponse:
    response = RedirectResponse(url, status_code=303)
    response.headers.update(HEADERS)
    return response


def safe_next(target: str | None) -> str:
    """Where to go after signing in: a dashboard path only (never another site)."""
    if not target:
        return PREFIX
    parts = urlsplit(target)
    if parts.scheme or parts.netloc or "\\" in target or not (
        parts.path == PREFIX or parts.path.startswith(PREFIX + "/")
    ):
        return PREFIX
    return target


class LoginRequired(Exception):
    def __init__(self, next_url: str) -> None:
        self.next_url = next_url


class Forbidden(Exception):
    def __init__(self, message: str) -> None:
        self.message = message


def enabled(request: Request) -> str:
    """The admin token; 404 (like /admin) when none is configured."""
    token = request.app.state.settings.admin_token
    if not token:
        raise ApiError(404, "admin_disabled", "the dashboard is disabled (RECSYS_ADMIN_TOKEN is not set)")
    return token


def signed_in(request: Request, token: Annotated[str, Depends(enabled)]) -> auth.Session:
    cookie = request.cookies.get(auth.SESSION_COOKIE)
    session = auth.read_session(cookie, token, request.app.state.dashboard.revoked)
    if session is None:
        here = request.url.path + (f"?{request.url.query}" if request.url.query else "")
        raise LoginRequired(here if request.method == "GET" else PREFIX)
    request.state.dashboard_session = session
    return session


def same_origin(request: Request) -> None:
    """A browser's Origin header, when sent, must name this host (belt and braces with the token)."""
    origin = request.headers.get("origin")
    if origin and origin != "null" and urlsplit(origin).netloc != request.headers.get("host"):
        raise Forbidden("this form was posted from another site")


def csrf_checked(
    request: Request,
    session: Annotated[auth.Session, Depends(signed_in)],
    csrf: Annotated[str | None, Form(max_length=128)] = None,
) -> auth.Session:
    """Every signed-in POST: same origin and the session's form token."""
    same_origin(request)
    if not auth.csrf_ok(csrf, request.app.state.settings.admin_token, session.sid):
        raise Forbidden("the form's security token is missing or wrong: reload the page and try again")
    return session


Session = Annotated[auth.Session, Depends(signed_in)]
CheckedSession = Annotated[auth.Session, Depends(csrf_checked)]


def _on_dashboard(request: Request) -> bool:
    return request.url.path == PREFIX or request.url.path.startswith(PREFIX + "/")


def install_handlers(app: Any) -> None:
    @app.exception_handler(LoginRequired)
    async def _login(_: Request, exc: LoginRequired) -> Response:
        return redirect(f"{PREFIX}/login?next={quote(exc.next_url, safe='')}")

    @app.exception_handler(Forbidden)
    async def _forbidden(request: Request, exc: Forbidden) -> Response:
        return page(request, "message.html", {"title": "Refused", "message": exc.message}, status=403)

    api_validation = app.exception_handlers[RequestValidationError]  # the API's JSON error (app.api.errors)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> Response:
        """A dashboard page with a bad parameter (a hand-edited URL, say) answers a page, not JSON."""
        if not _on_dashboard(request):
            return await api_validation(request, exc)
        wrong = "; ".join(f"{'.'.join(str(x) for x in e.get('loc', ())[1:]) or 'request'}: {e.get('msg', '')}"
                          for e in exc.errors())
        return page(request, "message.html", {"title": "Not understood", "message": wrong}, status=422)

    api_database = app.exception_handlers[SQLAlchemyError]  # the API's: 503 JSON when the database is away

    @app.exception_handler(SQLAlchemyError)
    async def _database(request: Request, exc: SQLAlchemyError) -> Response:
        """A dashboard page while the database is away (its reads, or the sign-out list every signed-in
        page checks) answers a page that says so, 503 with Retry-After, and works again when it returns."""
        if not (_on_dashboard(request) and unavailable(exc)):
            return await api_database(request, exc)
        response = page(request, "message.html", {
            "title": "Database unavailable",
            "message": "The database cannot be reached just now, so this page cannot be shown; reload it in a "
            "moment. The service goes on serving recommendations from the loaded model meanwhile.",
        }, status=503)
        response.headers["Retry-After"] = "5"
        return response
