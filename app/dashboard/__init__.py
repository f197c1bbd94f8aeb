"""The operator's web dashboard under /dashboard: sign-in with the admin token, the served model and the
service's traffic, model versions with their per-epoch diagnostics, promotion and roll-back, and a user
inspector that shows the negatives the trainer draws. Off (404) when RECSYS_ADMIN_TOKEN is unset."""

from __future__ import annotations

from fastapi import FastAPI

from app.dashboard import auth, login, pages, versions
from app.dashboard.web import DashboardState, install_handlers


def install(app: FastAPI) -> None:
    """Mount the dashboard's routes (kept out of the OpenAPI document: they serve HTML, not the API)."""
    # sign-outs go to the service's database (made at start-up, in the lifespan): every worker sees them
    app.state.dashboard = DashboardState(revoked=auth.Revoked(lambda: getattr(app.state, "engine", None)))
    install_handlers(app)
    app.include_router(login.router)
    app.include_router(versions.router)
    app.include_router(pages.router)
