"""README's first command, `recsys demo`, end to end: from an empty directory to a served model, and every
`curl` line it prints answered by the running service."""

from __future__ import annotations

import os
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
from api_support import free_port


def _curl_lines(output: str) -> list[list[str]]:
    """The printed curl commands as argument lists (continuation lines joined, the pipe to json.tool cut)."""
    joined = output.replace("\\\n", " ")
    return [shlex.split(line.split("|")[0]) for line in joined.splitlines() if line.strip().startswith("curl ")]


def _request(args: list[str]) -> httpx.Response:
    """What one curl line asks for, sent with httpx (-X, -H, -d and the URL; -s ignored)."""
    method, headers, body, url = "GET", {}, None, None
    it = iter(args[1:])
    for arg in it:
        if arg == "-X":
            method = next(it)
        elif arg == "-H":
            name, _, value = next(it).partition(":")
            headers[name.strip()] = value.strip()
        elif arg == "-d":
            body = next(it)
        elif not arg.startswith("-"):
            url = arg
    assert url is not None, args
    return httpx.request(method, url, headers=headers, content=body, timeout=30)


def test_demo_prints_curl_lines_that_work(tmp_path: Path) -> None:
    """Every curl line the demo prints gets a 2xx from the demo's own service, with content."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("RECSYS_")}
    cmd = [sys.executable, "-m", "app.cli", "demo", "--users", "300", "--items", "150", "--events", "6000",
           "--port", str(port)]
    log = tmp_path / "demo.log"
    with log.open("w") as out:
        proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
    try:
        deadline = time.monotonic() + 300
        while True:
            assert proc.poll() is None, log.read_text()
            assert time.monotonic() < deadline, "the demo did not come up in time:\n" + log.read_text()
            try:
                if httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        printed = log.read_text()
        for step in ("synth", "db upgrade", "import", "train"):
            assert f"$ recsys {step}" in printed, printed
        curls = _curl_lines(printed)
        assert len(curls) == 4, printed
        for args in curls:
            resp = _request(args)
            assert resp.is_success and resp.content, (args, resp.status_code, resp.text)
        assert re.search(r"open http://127\.0\.0\.1:\d+/docs", printed)
        assert (tmp_path / "var" / "recsys.db").exists()  # everything under ./var of where it ran
    finally:
        os.killpg(proc.pid, signal.SIGINT)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert "Traceback" not in log.read_text(), log.read_text()
