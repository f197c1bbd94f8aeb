"""`app.api.server.run` (what `recsys serve` calls): several workers, one aggregated /metrics."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
from api_support import ROOT, Deployment, free_port


def test_run_with_two_workers_aggregates_metrics(sqlite_deployment: Deployment, tmp_path: Path) -> None:
    port = free_port()
    env = {
        k: v for k, v in os.environ.items() if not k.startswith("RECSYS_") and k != "PROMETHEUS_MULTIPROC_DIR"
    }
    env.update(RECSYS_DATABASE_URL=sqlite_deployment.url, RECSYS_DATA_DIR=str(sqlite_deployment.data_dir))
    pinned = sqlite_deployment.checkpoints / "v1"
    code = (
        "from pathlib import Path; from app.api.server import run; "
        f"run(host='127.0.0.1', port={port}, workers=2, checkpoint=Path({str(pinned)!r}), log_level='warning')"
    )
    log = (tmp_path / "server.log").open("wb")
    proc = subprocess.Popen(
        [sys.executable, "-c", code], cwd=ROOT, env=env, stdout=log, stderr=log, start_new_session=True
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        text = ""
        while time.monotonic() < deadline:
            try:
                text = httpx.get(base + "/metrics", timeout=2).text
                if 'recsys_model_loads_total{outcome="loaded"} 2.0' in text:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        assert 'recsys_model_loads_total{outcome="loaded"} 2.0' in text, (tmp_path / "server.log").read_text()
        for i in range(20):
            assert httpx.get(f"{base}/v1/users/u{i}/recommendations", timeout=5).status_code == 200
        text = httpx.get(base + "/metrics", timeout=5).text
        served = [
            ln for ln in text.splitlines() if ln.startswith("recsys_model_info{") and ln.endswith(" 1.0")
        ]
        assert len(served) == 2 and all('version="v1"' in ln for ln in served)  # one line per worker pid
        requests = [
            ln
            for ln in text.splitlines()
            if ln.startswith(
                'recsys_http_requests_total{method="GET",route="/v1/users/{user_id}/recommendations"'
            )
        ]
        assert requests and float(requests[0].split()[-1]) == 20.0  # summed over both workers
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(30)
        log.close()


def test_recsys_serve_refuses_a_checkpoint_it_cannot_serve(sqlite_deployment: Deployment, tmp_path: Path) -> None:
    """An explicitly named checkpoint is checked before any worker starts: a clear error, exit 1."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RECSYS_")}
    env.update(RECSYS_DATABASE_URL=sqlite_deployment.url, RECSYS_DATA_DIR=str(tmp_path), RECSYS_PORT=str(free_port()))
    (tmp_path / "empty").mkdir()
    for given, reason in (
        (tmp_path / "missing", "not a checkpoint directory"),
        (tmp_path / "empty", "holds no checkpoint directories"),
    ):
        done = subprocess.run(
            [sys.executable, "-m", "app.cli", "serve", "--checkpoint", str(given)],
            cwd=ROOT, env=env, capture_output=True, text=True, timeout=60,
        )
        assert done.returncode == 1, done.stdout + done.stderr
        assert f"error: cannot serve --checkpoint {given}" in done.stderr and reason in done.stderr
