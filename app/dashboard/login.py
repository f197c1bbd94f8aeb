"""Sign-in and sign-out pages.

The token travels only in a POSTed form body: never in a URL, never logged (the access log records the
path alone). Wrong tokens are counted per client address and in all (auth.LoginLimiter); beyond the limit
the answer is 429 until the window passes, whatever the token.
"""

from __future__ import annotations

import secrets
from typing import Annotated

from fastapi import APIRouter, Depends, Form, Request
from fastapi.responses import Response

from app.dashboard import auth
from app.dashboard.web import PREFIX, CheckedSession, enabled, page, redirect, safe_next, same_origin

router = APIRouter(prefix=PREFIX, include_in_schema=False)
Token = Annotated[str, Depends(enabled)]


def _secure(request: Request) -> bool:
    return request.url.scheme == "https"


def _login_form(request: Request, token: str, message: str | None, next_url: str, status: int) -> Response:
    nonce = secrets.token_urlsafe(18)
    response = page(
        request,
        "login.html",
        {"message": message, "next": next_url, "login_csrf": auth.csrf_token(token, "login:" + nonce)},
        status=status,
    )
    response.set_cookie(
        auth.LOGIN_COOKIE, nonce, max_age=auth.LOGIN_SECONDS, path=auth.COOKIE_PATH, httponly=True,
        samesite="strict", secure=_secure(request),
    )
    return response


@router.get("/login")
def login_page(request: Request, token: Token, next: str | None = None, signed_out: bool = False) -> Response:
    if auth.read_session(request.cookies.get(auth.SESSION_COOKIE), token, request.app.state.dashboard.revoked):
        return redirect(safe_next(next))
    message = "You are signed out." if signed_out else None
    return _login_form(request, token, message, safe_next(next), 200)


def _client(request: Request) -> str:
    return request.client.host if request.client else "unknown"


@router.post("/login")
def login(
    request: Request,
    token: Token,
    admin_token: Annotated[str, Form(alias="token", max_length=4096)] = "",
    csrf: Annotated[str, Form(max_length=128)] = "",
    next: Annotated[str, Form(max_length=2048)] = PREFIX,
) -> Response:
    same_origin(request)
    limiter: auth.LoginLimiter = request.app.state.dashboard.limiter
    client, target = _client(request), safe_next(next)
    wait = limiter.retry_after(client)
    if wait:
        response = _login_form(
            request, token, f"Too many wrong tokens: try again in {wait} s.", target, 429
        )
        response.headers["Retry-After"] = str(wait)
        return response
    nonce = request.cookies.get(auth.LOGIN_COOKIE)
    if not auth.csrf_ok(csrf, token, "login:" + nonce if nonce else None):
        return _login_form(
            request, token, "The sign-in form expired or cookies are off: try again.", target, 403
        )
    if not auth.token_matches(admin_token, token):
        limiter.failed(client)
        return _login_form(request, token, "Wrong token.", target, 401)
    limiter.succeeded(client)
    session, cookie = auth.new_session(token)
    response = redirect(target)
    response.set_cookie(
        auth.SESSION_COOKIE, cookie, max_age=auth.SESSION_SECONDS, path=auth.COOKIE_PATH, httponly=True,
        samesite="strict", secure=_secure(request),
    )
    response.delete_cookie(auth.LOGIN_COOKIE, path=auth.COOKIE_PATH, httponly=True, samesite="strict",
                           secure=_secure(request))
    return response


@router.post("/logout")
def logout(request: Request, session: CheckedSession) -> Response:
    request.app.state.dashboard.revoked.add(session)
    response = redirect(f"{PREFIX}/login?signed_out=true")
    response.delete_cookie(auth.SESSION_COOKIE, path=auth.COOKIE_PATH, httponly=True, samesite="strict",
                           secure=_secure(request))
    return response
