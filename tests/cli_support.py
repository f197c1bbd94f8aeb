"""The `recsys` command as a user runs it: a subprocess, with only the RECSYS_* settings a test gives."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def environment(**settings: str) -> dict[str, str]:
    """This process's environment without its RECSYS_* variables, plus ``settings``."""
    return {**{k: v for k, v in os.environ.items() if not k.startswith("RECSYS_")}, **settings}


def recsys(env: dict[str, str], *args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "app.cli", *args],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
