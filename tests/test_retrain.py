"""`recsys retrain` end to end: feedback through HTTP shapes the next model, the gate, the lock, crashes."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
from api.api_support import Deployment, Server

from app.db import registry
from app.db.engine import make_engine
from app.db.events import insert_events
from app.db.migrate import upgrade
from trainer.checkpoint import list_checkpoints
from trainer.synth import SynthSpec, generate

ROOT = Path(__file__).resolve().parent.parent
SPEC = SynthSpec(users=400, items=300, events=12_000, seed=11)
FAST = ["--epochs", "8", "--no-progress"]


def recsys(env: dict[str, str], *args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "app.cli", *args],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.fixture
def site(tmp_path: Path) -> Iterator[tuple[Deployment, dict[str, str]]]:
    """A SQLite deployment holding the synthetic log, and the environment that points the CLI at it."""
    url = f"sqlite:///{tmp_path / 'recsys.db'}"
    upgrade(url)
    frame = generate(SPEC)
    engine = make_engine(url)
    with engine.begin() as conn:
        insert_events(conn, frame)
    engine.dispose()
    env = {k: v for k, v in os.environ.items() if not k.startswith("RECSYS_")}
    env.update(RECSYS_DATABASE_URL=url, RECSYS_DATA_DIR=str(tmp_path))
    yield Deployment(url, tmp_path, frame), env


def promoted(url: str) -> str | None:
    engine = make_engine(url)
    with engine.connect() as conn:
        row = registry.current_promoted(conn)
    engine.dispose()
    return row["version"] if row else None


def test_new_taste_posted_over_http_reaches_recommendations_after_retrain(
    site: tuple[Deployment, dict[str, str]],
) -> None:
    dep, env = site
    first = recsys(env, "retrain", *FAST)
    assert first.returncode == 0, first.stderr
    assert "promoted" in first.stdout and "first model" in first.stdout
    v1 = promoted(dep.url)

    frame = dep.frame
    user_cluster, item_cluster = frame.attrs["user_cluster"], frame.attrs["item_cluster"]
    counts = frame["user_id"].value_counts()
    source, target = 0, 1
    group = [f"u{u}" for u in np.flatnonzero(user_cluster == source) if 5 <= counts.get(f"u{u}", 0) <= 20][
        :25
    ]
    target_items = [f"i{i}" for i in np.flatnonzero(item_cluster == target)]
    seen = frame.groupby("user_id")["item_id"].agg(set)
    assert len(group) >= 10 and len(target_items) >= 30

    server = Server(dep, poll=0.3)
    try:
        server.wait_ready()
        client = server.client()

        def target_share() -> float:
            shares = []
            for user in group:
                resp = client.get(f"/v1/users/{user}/recommendations", params={"k": 10})
                assert resp.status_code == 200, resp.text
                items = [it["item_id"] for it in resp.json()["items"]]
                shares.append(np.mean([it in set(target_items) for it in items]))
            return float(np.mean(shares))

        before = target_share()
        rng = np.random.default_rng(0)
        now = time.time()
        for user in group:
            fresh = [it for it in target_items if it not in seen[user]]
            liked = rng.choice(fresh, size=25, replace=False)
            batch = [
                {
                    "event_id": f"shift-{user}-{it}",
                    "user_id": user,
                    "item_id": str(it),
                    "type": "like",
                    "timestamp": now + k,
                }
                for k, it in enumerate(liked)
            ]
            assert client.post("/v1/events", json=batch).status_code == 200

        # Load on the server during the retrain and the swap: every request must succeed.
        failures: list[str] = []
        versions: set[str] = set()
        stop = threading.Event()

        def hammer() -> None:
            with server.client() as c:
                while not stop.is_set():
                    try:
                        r = c.get(f"/v1/users/{group[0]}/recommendations", params={"k": 5})
                        if r.status_code != 200:
                            failures.append(f"{r.status_code} {r.text[:200]}")
                        else:
                            versions.add(r.json()["model_version"])
                    except httpx.HTTPError as exc:
                        failures.append(repr(exc))

        load = threading.Thread(target=hammer)
        load.start()
        try:
            second = recsys(env, "retrain", *FAST)
            assert second.returncode == 0, second.stderr
            assert "promoted" in second.stdout, second.stdout
            v2 = promoted(dep.url)
            assert v2 != v1
            deadline = time.monotonic() + 30
            while client.get(f"/v1/users/{group[0]}/recommendations").json()["model_version"] != v2:
                assert time.monotonic() < deadline, "the service did not pick up the promoted model"
                time.sleep(0.2)
            time.sleep(0.5)
        finally:
            stop.set()
            load.join()
        assert not failures, failures[:5]
        assert {v1, v2} <= versions  # the load saw both models: the swap happened under it
        after = target_share()
    finally:
        server.stop()
    assert before < 0.1, before
    assert after > 0.3 and after > before + 0.25, (before, after)


def test_worse_candidate_is_rejected_and_the_old_model_stays(site: tuple[Deployment, dict[str, str]]) -> None:
    dep, env = site
    assert recsys(env, "retrain", *FAST).returncode == 0
    v1 = promoted(dep.url)
    engine = make_engine(dep.url)
    extra = dep.frame.sample(300, random_state=1).assign(
        event_id=lambda f: "later-" + f["event_id"], timestamp=lambda f: f["timestamp"] + 1e8
    )
    with engine.begin() as conn:
        insert_events(conn, extra)
    engine.dispose()
    broken = recsys(env, "retrain", "--from-scratch", "--lr", "1e-7", "--epochs", "1", "--no-progress")
    assert broken.returncode == 0, broken.stderr
    assert "rejected" in broken.stdout and "worse than the current model" in broken.stdout
    assert promoted(dep.url) == v1
    listing = recsys(env, "models", "list")
    assert "rejected" in listing.stdout and v1 in listing.stdout


def test_second_run_refused_while_first_holds_the_lock_and_a_killed_run_leaves_nothing(
    site: tuple[Deployment, dict[str, str]],
) -> None:
    dep, env = site
    slow = subprocess.Popen(
        [sys.executable, "-m", "app.cli", "retrain", "--epochs", "200", "--no-progress"],
        env=env,
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        assert slow.stdout is not None
        line = slow.stdout.readline()  # printed once the lock is held and the events are read
        assert line.startswith("read "), line
        second = recsys(env, "retrain", *FAST)
        assert second.returncode == 75
        assert "another `retrain` run" in second.stderr and "holds the lock" in second.stderr
        time.sleep(2)  # into training
    finally:
        slow.send_signal(signal.SIGKILL)
        slow.wait()
    checkpoints = dep.data_dir / "checkpoints"
    assert list_checkpoints(checkpoints) == []
    assert promoted(dep.url) is None
    after_crash = recsys(env, "retrain", *FAST)
    assert after_crash.returncode == 0, after_crash.stderr
    assert len(list_checkpoints(checkpoints)) == 1 and promoted(dep.url) is not None


def test_rollback_returns_to_the_previous_model(site: tuple[Deployment, dict[str, str]]) -> None:
    dep, env = site
    assert recsys(env, "retrain", *FAST).returncode == 0
    v1 = promoted(dep.url)
    forced = recsys(env, "retrain", "--force", *FAST)
    assert forced.returncode == 0 and "promoted" in forced.stdout, forced.stdout + forced.stderr
    v2 = promoted(dep.url)
    assert v2 != v1
    back = recsys(env, "models", "rollback")
    assert back.returncode == 0, back.stderr
    assert promoted(dep.url) == v1
    assert recsys(env, "models", "promote", "no-such-version").returncode == 1
