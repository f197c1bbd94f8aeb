"""Dashboard sign-in: the admin token exchanged for a signed, expiring session cookie; CSRF tokens; a limit
on wrong tokens.

Sessions are stateless: the cookie holds a random session id and an expiry, signed with HMAC-SHA256 under a
key derived from RECSYS_ADMIN_TOKEN, so every worker and replica accepts it without shared storage, and
changing the token ends every session. Sign-out deletes the cookie and revokes its id in the database, for
every worker (the id also dies at its expiry). Every form carries a CSRF token that is an HMAC of the session id
(the sign-in form's, of a nonce held in a short-lived cookie), so a page of another site cannot post one.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import secrets
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from sqlalchemy import Engine, delete, insert, select
from sqlalchemy.exc import IntegrityError

from app.db.models import DashboardRevocation

SESSION_COOKIE = "recsys_dashboard"
LOGIN_COOKIE = "recsys_dashboard_login"
COOKIE_PATH = "/dashboard"
SESSION_SECONDS = 8 * 3600
LOGIN_SECONDS = 3600  # how long a sign-in form stays valid


def _key(admin_token: str, purpose: str) -> bytes:
    return hmac.new(admin_token.encode(), f"recsys-dashboard/{purpose}".encode(), hashlib.sha256).digest()


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def token_matches(given: str, admin_token: str) -> bool:
    """Constant-time comparison of digests, so neither content nor length leaks through timing."""
    a = hashlib.sha256(given.encode()).digest()
    b = hashlib.sha256(admin_token.encode()).digest()
    return hmac.compare_digest(a, b)


@dataclass(frozen=True)
class Session:
    sid: str
    expires: int


def new_session(admin_token: str, now: float | None = None) -> tuple[Session, str]:
    """A fresh session and its cookie value."""
    session = Session(secrets.token_urlsafe(18), int((now or time.time()) + SESSION_SECONDS))
    payload = _b64(json.dumps({"sid": session.sid, "exp": session.expires}, separators=(",", ":")).encode())
    sig = _b64(hmac.new(_key(admin_token, "session"), payload.encode(), hashlib.sha256).digest())
    return session, f"{payload}.{sig}"


def read_session(
    cookie: str | None, admin_token: str, revoked: Revoked, now: float | None = None
) -> Session | None:
    """The session a cookie holds, or None when it is absent, forged, malformed, expired or revoked."""
    if not cookie or cookie.count(".") != 1 or len(cookie) > 512:
        return None
    payload, sig = cookie.split(".")
    expected = _b64(hmac.new(_key(admin_token, "session"), payload.encode(), hashlib.sha256).digest())
    if not hmac.compare_digest(sig.encode(), expected.encode()):
        return None
    try:
        data = json.loads(_unb64(payload))
        session = Session(str(data["sid"]), int(data["exp"]))
    except (ValueError, KeyError, TypeError):
        return None
    if session.expires <= (now or time.time()) or revoked.contains(session):
        return None
    return session


def csrf_token(admin_token: str, bound_to: str) -> str:
    """The form token for a session id (or a sign-in nonce): only this server can compute it."""
    return _b64(hmac.new(_key(admin_token, "csrf"), bound_to.encode(), hashlib.sha256).digest())


def csrf_ok(given: str | None, admin_token: str, bound_to: str | None) -> bool:
    if not given or not bound_to:
        return False
    return hmac.compare_digest(given.encode(), csrf_token(admin_token, bound_to).encode())


class Revoked:
    """Session ids signed out before their expiry. With an engine they are kept in the database
    (``dashboard_revocations``), so every worker and replica refuses the cookie; this worker also remembers
    the ones it saw, so a revoked cookie costs no query twice. Without an engine (unit tests): memory only."""

    def __init__(self, engine: Callable[[], Engine | None] = lambda: None) -> None:
        self._engine = engine
        self._until: dict[str, int] = {}
        self._lock = threading.Lock()

    def add(self, session: Session) -> None:
        now = int(time.time())
        engine = self._engine()
        if engine is not None:
            try:
                with engine.begin() as conn:
                    conn.execute(delete(DashboardRevocation).where(DashboardRevocation.expires_at <= now))
                    conn.execute(insert(DashboardRevocation).values(sid=session.sid, expires_at=session.expires))
            except IntegrityError:
                pass  # signed out twice at once, by two workers: revoked either way
        with self._lock:
            self._until = {sid: exp for sid, exp in self._until.items() if exp > now}
            self._until[session.sid] = session.expires

    def contains(self, session: Session) -> bool:
        if session.sid in self._until:
            return True
        engine = self._engine()
        if engine is None:
            return False
        with engine.connect() as conn:
            found = conn.execute(select(DashboardRevocation.sid).where(DashboardRevocation.sid == session.sid))
            if found.first() is None:
                return False
        with self._lock:
            self._until[session.sid] = session.expires
        return True


class LoginLimiter:
    """Wrong tokens allowed per client and in all within a sliding window; beyond, sign-in is refused
    without even comparing the token, so guessing gains nothing."""

    def __init__(self, per_client: int = 5, overall: int = 30, window: float = 60.0) -> None:
        self.per_client, self.overall, self.window = per_client, overall, window
        self._clients: dict[str, deque[float]] = {}
        self._all: deque[float] = deque()
        self._lock = threading.Lock()

    def _trim(self, times: deque[float], now: float) -> None:
        while times and times[0] <= now - self.window:
            times.popleft()

    def retry_after(self, client: str, now: float | None = None) -> int:
        """Seconds until this client may try again; 0 when it may now."""
        now = time.monotonic() if now is None else now
        with self._lock:
            mine = self._clients.get(client, deque())
            self._trim(mine, now)
            self._trim(self._all, now)
            waits = [times[0] + self.window - now for times, cap in ((mine, self.per_client), (self._all, self.overall))
                     if len(times) >= cap]
        return max(1, int(max(waits)) + 1) if waits else 0

    def failed(self, client: str, now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        with self._lock:
            if len(self._clients) > 10_000:  # bounded memory under a flood of addresses
                self._clients = {c: t for c, t in self._clients.items() if t and t[-1] > now - self.window}
            self._clients.setdefault(client, deque()).append(now)
            self._all.append(now)

    def succeeded(self, client: str) -> None:
        with self._lock:
            self._clients.pop(client, None)
