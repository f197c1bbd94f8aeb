"""Property-based run of schemathesis against /openapi.json: no 5xx, every response matches the schema.

Runs the CLI against the live server (admin token included), bounded by examples and time so the
suite stays quick on two cores. The coverage phase sends invalid input too: invalid input must get a documented 4xx.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from api_support import ADMIN_TOKEN, Deployment, Server

CHECKS = "not_a_server_error,status_code_conformance,content_type_conformance,response_schema_conformance"


def test_schemathesis_finds_no_5xx_and_no_schema_violation(
    sqlite_deployment: Deployment, tmp_path: Path
) -> None:
    """One run, on SQLite, keeps the suite short: the application code is the same on both backends."""
    server = Server(sqlite_deployment)
    try:
        server.wait_ready()
        _run_schemathesis(server, tmp_path)
    finally:
        server.stop()


def _run_schemathesis(server: Server, tmp_path: Path) -> None:
    cli = Path(sys.executable).parent / "schemathesis"
    cmd = [
        str(cli),
        "run",
        f"{server.base}/openapi.json",
        "--checks",
        CHECKS,
        "--max-examples",
        "30",
        "--max-time",
        "60",
        "--phases",
        "examples,coverage,fuzzing",
        "--seed",
        "1",
        "--no-shrink",
        "--generation-database",
        "none",
        "--request-timeout",
        "10",
        "-H",
        f"Authorization: Bearer {ADMIN_TOKEN}",
        "--exclude-path",
        "/admin/reload",
        "--exclude-path-regex",
        "^/admin/models/.*/promote$",
    ]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=180, cwd=tmp_path)
    assert out.returncode == 0, out.stdout[-6000:] + out.stderr[-2000:]
    assert "passed" in out.stdout.lower() or "no issues" in out.stdout.lower(), out.stdout[-3000:]
