"""`recsys retrain` end to end: feedback through HTTP shapes the next model, the gate, the lock, crashes."""

from __future__ import annotations

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
from api.api_support import Deployment, Server, cluster_checkpoint, load_log
from cli_support import environment, recsys

from app.db import registry
from app.db.engine import make_engine
from app.db.events import insert_events
from trainer.checkpoint import list_checkpoints
from trainer.synth import SynthSpec, generate

ROOT = Path(__file__).resolve().parent.parent
SPEC = SynthSpec(users=400, items=300, events=12_000, seed=11)
FAST = ["--epochs", "8", "--no-progress"]


@pytest.fixture
def site(tmp_path: Path) -> Iterator[tuple[Deployment, dict[str, str]]]:
    """A SQLite deployment holding the synthetic log, and the environment that points the CLI at it."""
    dep = load_log(f"sqlite:///{tmp_path / 'recsys.db'}", tmp_path, generate(SPEC))
    env = environment(RECSYS_DATABASE_URL=dep.url, RECSYS_DATA_DIR=str(tmp_path))
    yield dep, env


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
        [sys.executable, "-m", "app.cli", "retrain", "--epochs", "200", "--patience", "200", "--no-progress"],
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


def _registered(dep: Deployment, *versions: str, watermark: int) -> dict[str, Path]:
    """Checkpoints of the planted clusters, each registered and promoted in turn (the last one is current)."""
    paths = {}
    engine = make_engine(dep.url)
    try:
        for version in versions:
            paths[version] = cluster_checkpoint(dep.data_dir / "checkpoints", dep.frame, version, watermark=watermark)
            with engine.begin() as conn:
                registry.register(conn, version, str(paths[version]), watermark=watermark, status="promoted")
    finally:
        engine.dispose()
    return paths


def _corrupt(path: Path) -> None:
    emb = path / "item_embeddings.npy"
    emb.write_bytes(emb.read_bytes()[:-8] + b"\xff" * 8)


def test_an_unreadable_promoted_model_is_not_a_first_model(site: tuple[Deployment, dict[str, str]]) -> None:
    """The gate then compares against the newest readable model promoted before it, and says so."""
    dep, env = site
    paths = _registered(dep, "v1", "v2", watermark=len(dep.frame) - 500)
    _corrupt(paths["v2"])
    run = recsys(env, "retrain", "--epochs", "2", "--no-progress")
    assert run.returncode == 0, run.stderr
    assert "first model" not in run.stdout
    assert "v2 cannot be read" in run.stdout and "compared against v1" in run.stdout
    engine = make_engine(dep.url)
    with engine.connect() as conn:
        newest = registry.list_versions(conn)[0]
    engine.dispose()
    assert newest["metrics"]["gate"]["against"] == "v1" and "v2 cannot be read" in newest["metrics"]["gate"]["note"]


def test_retrain_refuses_when_no_promoted_model_can_be_read(site: tuple[Deployment, dict[str, str]]) -> None:
    dep, env = site
    _corrupt(_registered(dep, "v1", watermark=len(dep.frame))["v1"])
    run = recsys(env, "retrain", "--force", "--epochs", "2", "--no-progress")
    assert run.returncode == 1
    assert "v1 cannot be read" in run.stderr and "the promoted model is untouched" in run.stderr
    assert promoted(dep.url) == "v1" and list_checkpoints(dep.data_dir / "checkpoints") == [dep.data_dir / "checkpoints" / "v1"]


def test_a_rollback_that_fails_half_way_changes_nothing(site: tuple[Deployment, dict[str, str]]) -> None:
    """Re-promoting the previous version and rejecting the current one are one transaction: a database that
    refuses the second write leaves the registry as it was (here a trigger refuses it)."""
    dep, env = site
    _registered(dep, "v1", "v2", watermark=len(dep.frame))
    engine = make_engine(dep.url)
    with engine.begin() as conn:
        conn.exec_driver_sql(
            "CREATE TRIGGER no_rejects BEFORE UPDATE OF status ON model_versions WHEN NEW.status = 'rejected' "
            "BEGIN SELECT RAISE(ABORT, 'rejections are refused'); END"
        )

    def statuses() -> dict[str, str]:
        with engine.connect() as conn:
            return {v["version"]: v["status"] for v in registry.list_versions(conn)}

    try:
        failed = recsys(env, "models", "rollback")
        assert failed.returncode != 0 and "rejections are refused" in failed.stderr
        assert statuses() == {"v1": "candidate", "v2": "promoted"}
        with engine.begin() as conn:
            conn.exec_driver_sql("DROP TRIGGER no_rejects")
        back = recsys(env, "models", "rollback")
        assert back.returncode == 0, back.stderr
        assert "rolled back from v2 (now rejected) to v1" in back.stdout
        assert statuses() == {"v1": "promoted", "v2": "rejected"}
        again = recsys(env, "models", "rollback")
        assert again.returncode == 1 and "v1 is the only version ever promoted" in again.stderr
    finally:
        engine.dispose()


def test_a_checkpoint_folder_that_cannot_be_made_fails_before_the_fit(site: tuple[Deployment, dict[str, str]],
                                                                     tmp_path: Path) -> None:
    dep, env = site
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    run = recsys({**env, "RECSYS_CHECKPOINT_DIR": str(blocker / "checkpoints")}, "retrain", "--no-progress")
    assert run.returncode == 1
    assert run.stderr == f"error: [Errno 20] Not a directory: '{blocker / 'checkpoints'}'\n"
    assert promoted(dep.url) is None
