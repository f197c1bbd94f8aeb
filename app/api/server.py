"""``recsys serve``: uvicorn with the app factory, configured for one or several workers."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import uvicorn

from app.api.main import CHECKPOINT_ENV


def run(host: str, port: int, workers: int, checkpoint: Path | None, log_level: str) -> None:
    """Start the service; blocks until it stops.

    The pinned checkpoint travels in RECSYS_SERVE_CHECKPOINT so every worker process sees it. With
    several workers, Prometheus multiprocess mode gets a fresh directory so /metrics covers all of them.
    """
    if checkpoint is not None:
        os.environ[CHECKPOINT_ENV] = str(Path(checkpoint).resolve())
    mp_dir = None
    if workers > 1 and not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        mp_dir = tempfile.mkdtemp(prefix="recsys-metrics-")
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = mp_dir
    try:
        uvicorn.run(
            "app.api.main:create_app",
            factory=True,
            host=host,
            port=port,
            workers=workers,
            log_level=log_level.lower(),
            access_log=False,
        )
    finally:
        if mp_dir:
            shutil.rmtree(mp_dir, ignore_errors=True)
