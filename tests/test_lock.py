"""The job lock excludes a second process on both backends and dies with its holder."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from app.db.engine import make_engine
from app.db.lock import LockHeld, job_lock
from app.db.migrate import upgrade

ROOT = Path(__file__).resolve().parent.parent

HOLDER = """
import sys, time
from app.db.engine import make_engine
from app.db.lock import job_lock
with job_lock(make_engine(sys.argv[1]), "retrain"):
    print("locked", flush=True)
    time.sleep(60)
"""


def test_second_process_is_refused_until_the_holder_dies(db_url: str) -> None:
    upgrade(db_url)
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLDER, db_url], stdout=subprocess.PIPE, text=True, cwd=ROOT
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "locked"
        engine = make_engine(db_url)
        with pytest.raises(LockHeld, match="another `retrain` run"), job_lock(engine):
            pass
        with job_lock(engine, "some-other-job"):  # other names are independent
            pass
    finally:
        holder.kill()  # like kill -9: no clean release
        holder.wait()
    deadline = time.monotonic() + 10
    while True:
        try:
            with job_lock(engine):
                break
        except LockHeld:
            assert time.monotonic() < deadline, "lock survived its holder"
            time.sleep(0.1)
    with job_lock(engine):  # released at the end of the block, so it can be taken again
        pass
    engine.dispose()
