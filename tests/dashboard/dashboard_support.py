"""Test plumbing for the dashboard: `recsys serve` as a real subprocess, the sign-in form, Chromium's path."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "api"))  # the HTTP tests' plumbing

from api_support import ADMIN_TOKEN, ROOT, Deployment, Server, cluster_checkpoint, deploy, free_port  # noqa: E402

from app.db import registry  # noqa: E402
from app.db.engine import make_engine  # noqa: E402

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
    "--disable-component-update", "--no-first-run", "--disable-sync", "--disable-dev-shm-usage",
]
DOCS = ROOT / "docs"


class DashServer(Server):
    """`recsys serve` (the real CLI, real uvicorn) on a free port instead of Server's bare uvicorn; the access
    log is on (the tests read it)."""

    def __init__(self, dep: Deployment, *, admin_token: str | None = ADMIN_TOKEN, log_level: str = "info") -> None:
        self.dep = dep
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        env = {k: v for k, v in os.environ.items() if not k.startswith("RECSYS_")}
        env.update(
            RECSYS_DATABASE_URL=dep.url, RECSYS_DATA_DIR=str(dep.data_dir), RECSYS_RELOAD_POLL_SECONDS="0",
            RECSYS_LOG_LEVEL=log_level,
        )
        if admin_token:
            env["RECSYS_ADMIN_TOKEN"] = admin_token
        self.log_path = dep.data_dir / f"serve-{self.port}.log"
        self._log = self.log_path.open("wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "app.cli", "serve", "--host", "127.0.0.1", "--port", str(self.port)],
            cwd=ROOT, env=env, stdout=self._log, stderr=subprocess.STDOUT,
        )
        self.wait_ready(timeout=60.0)

    def signed_in(self, client: httpx.Client, token: str = ADMIN_TOKEN) -> httpx.Response:
        """Sign ``client`` in through the form (GET for the form token, then POST)."""
        form = client.get("/dashboard/login")
        return client.post("/dashboard/login", data={"token": token, "csrf": form_token(form.text), "next": "/dashboard"})


def form_token(html: str) -> str:
    found = re.search(r'name="csrf" value="([^"]+)"', html)
    assert found, html[:2000]
    return found.group(1)


def deployment(data_dir: Path) -> Deployment:
    """The synthetic log in SQLite, v1 trained by the trainer and promoted, v2 (the log's planted clusters,
    with the sparse diagnostics of an older checkpoint) registered as a candidate, and v0: registered by
    hand with odd metrics, its checkpoint gone."""
    dep = deploy(f"sqlite:///{data_dir / 'recsys.db'}", data_dir, trained=True)
    path = cluster_checkpoint(dep.checkpoints, dep.frame, "v2", watermark=None, seed=1)
    engine = make_engine(dep.url)
    try:
        with engine.begin() as conn:
            registry.register(conn, "v0", str(data_dir / "gone"), metrics={"test": 0.3, "gate": "?"})
            registry.register(conn, "v2", str(path), metrics={"test": {"ndcg@10": 0.5}})
    finally:
        engine.dispose()
    return dep
