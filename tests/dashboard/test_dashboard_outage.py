"""The dashboard and the API while PostgreSQL is away: 503 pages and JSON on one kept connection, then
recovery without a restart of the service."""

from __future__ import annotations

import time
from pathlib import Path

import httpx
from dashboard_support import ADMIN_TOKEN, DashServer, deploy
from pg_support import OwnPostgres

PAGES = ("/dashboard", "/dashboard/models", "/dashboard/users/u1")


def test_pages_say_the_database_is_away_and_work_again_when_it_returns(own_postgres: OwnPostgres,
                                                                       tmp_path: Path) -> None:
    srv = DashServer(deploy(own_postgres.url, tmp_path))
    try:
        with srv.client() as client:
            assert srv.signed_in(client).status_code == 303
            assert all(client.get(path).status_code == 200 for path in PAGES)
            own_postgres.stop()
            for path in PAGES:  # every answer on the same keep-alive connection: none may drop it
                page = client.get(path)
                assert page.status_code == 503, (path, page.text[:300])
                assert page.headers["content-type"].startswith("text/html")
                assert "Database unavailable" in page.text and page.headers["retry-after"] == "5"
            api = client.get("/admin/models", headers={"Authorization": f"Bearer {ADMIN_TOKEN}"})
            assert api.status_code == 503 and api.json()["error"]["code"] == "database_unavailable"
            own_postgres.start()
            deadline = time.monotonic() + 30
            while client.get("/dashboard").status_code != 200:
                assert time.monotonic() < deadline, "the dashboard did not come back with the database"
                time.sleep(0.2)
            assert all(client.get(path).status_code == 200 for path in PAGES)
        metrics = httpx.get(srv.base + "/metrics").text
        assert 'route="/dashboard/models",status="503"' in metrics  # counted as answered, not as a 500
        assert 'status="500"' not in metrics
    finally:
        srv.stop()
