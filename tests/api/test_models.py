"""Model lifecycle on a real server: readiness, start-up choice, admin registry, hot swap, refusal."""

from __future__ import annotations

import threading
import time
from collections import Counter
from pathlib import Path

import httpx
from api_support import ADMIN_TOKEN, Deployment, Server, assert_error, cluster_checkpoint, deploy

from app.db import registry
from app.db.engine import make_engine
from app.db.migrate import downgrade


def _corrupt(path: Path) -> None:
    emb = path / "item_embeddings.npy"
    data = bytearray(emb.read_bytes())
    data[-8:] = b"\xff" * 8
    emb.write_bytes(bytes(data))


def _register(dep: Deployment, version: str, path: Path, *, promote: bool) -> None:
    engine = make_engine(dep.url)
    try:
        with engine.begin() as conn:
            registry.register(
                conn, version, str(path), watermark=None, status="promoted" if promote else "candidate"
            )
    finally:
        engine.dispose()


def test_admin_models_reload_and_promote(server: Server) -> None:
    with server.admin() as a:
        models = a.get("/admin/models").json()
        assert models["served_version"] == "v1"
        (v1,) = [m for m in models["models"] if m["version"] == "v1"]
        assert v1["served"] and v1["status"] == "promoted" and "ndcg@10" in v1["metrics"]["held_out"]
        assert v1["diagnostics"] and {"epoch", "informative_rate"} <= set(v1["diagnostics"][0])
        assert a.post("/admin/reload").json() == {
            "model_version": "v1",
            "changed": False,
            "load_seconds": None,
        }
        promoted = a.post("/admin/models/v1/promote").json()
        assert promoted["model_version"] == "v1" and promoted["changed"] is False


def test_recommendations_follow_the_embeddings(tmp_path: Path) -> None:
    """With the planted clusters as embeddings, every list stays in the user's (or item's) cluster."""
    dep = deploy(f"sqlite:///{tmp_path / 'recsys.db'}", tmp_path)
    clusters, home = dep.frame.attrs["item_cluster"], dep.frame.attrs["user_cluster"]
    srv = Server(dep)
    try:
        srv.wait_ready()
        with srv.client() as c:
            for user in ("u1", "u2", "u9"):
                items = c.get(f"/v1/users/{user}/recommendations", params={"k": 10}).json()["items"]
                assert {int(clusters[int(i["item_id"][1:])]) for i in items} == {int(home[int(user[1:])])}
            similar = c.get("/v1/items/i3/similar", params={"k": 8}).json()["items"]
            assert all(clusters[int(i["item_id"][1:])] == clusters[3] for i in similar)
            # The checkpoint's explicit negatives are never recommended to their user.
            top = [
                i["item_id"] for i in c.get("/v1/users/u1/recommendations", params={"k": 3}).json()["items"]
            ]
        v2 = cluster_checkpoint(dep.checkpoints, dep.frame, "v2", watermark=None, feedback={"u1": top[:2]})
        _register(dep, "v2", v2, promote=True)
        with srv.admin() as a:
            assert a.post("/admin/reload").json()["model_version"] == "v2"
        with srv.client() as c:
            after = [
                i["item_id"] for i in c.get("/v1/users/u1/recommendations", params={"k": 3}).json()["items"]
            ]
            assert not set(top[:2]) & set(after) and top[2] in after
            allowed = c.get("/v1/users/u1/recommendations", params={"k": 50, "exclude_seen": False}).json()
            assert not set(top[:2]) & {i["item_id"] for i in allowed["items"]}
            # Fold-in: a new user who likes three items of i3's cluster gets more of that cluster.
            same = [f"i{j}" for j in range(len(clusters)) if clusters[j] == clusters[3]][:3]
            batch = [
                {"event_id": f"f{j}", "user_id": "newcomer", "item_id": i, "type": "like"}
                for j, i in enumerate(same)
            ]
            assert c.post("/v1/events", json=batch).json()["accepted"] == 3
            body = c.get("/v1/users/newcomer/recommendations", params={"k": 5}).json()
            assert body["source"] == "fold_in"
            assert all(clusters[int(i["item_id"][1:])] == clusters[3] for i in body["items"])
            assert not {i["item_id"] for i in body["items"]} & set(same)
    finally:
        srv.stop()


def test_admin_routes_are_off_without_a_token(sqlite_deployment: Deployment) -> None:
    srv = Server(sqlite_deployment, admin_token=None)
    try:
        srv.wait_ready()
        with srv.client(headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}) as c:
            assert_error(c.get("/admin/models"), 404, "admin_disabled")
            assert_error(c.post("/admin/reload"), 404, "admin_disabled")
            assert c.get("/v1/users/u1/recommendations").status_code == 200
    finally:
        srv.stop()


def test_not_ready_without_a_checkpoint_then_reload(tmp_path: Path) -> None:
    dep = deploy(f"sqlite:///{tmp_path / 'recsys.db'}", tmp_path, promote=False)
    moved = tmp_path / "parked"
    (dep.checkpoints / "v1").rename(moved)
    srv = Server(dep)
    try:
        srv.wait_ready(path="/healthz")
        with srv.client() as c:
            assert_error(c.get("/readyz"), 503, "no_model")
            assert_error(c.get("/v1/users/u1/recommendations"), 503, "no_model")
        moved.rename(dep.checkpoints / "v1")
        with srv.admin() as a:
            assert a.post("/admin/reload").json()["model_version"] == "v1"
        with srv.client() as c:
            assert c.get("/readyz").json()["model_version"] == "v1"
    finally:
        srv.stop()


def test_start_up_skips_a_corrupt_newest_checkpoint(tmp_path: Path) -> None:
    """Nothing promoted: the newest checkpoint on disk is broken, so the service serves the next one."""
    dep = deploy(f"sqlite:///{tmp_path / 'recsys.db'}", tmp_path, promote=False)
    _corrupt(cluster_checkpoint(dep.checkpoints, dep.frame, "v2", watermark=None))
    srv = Server(dep)
    try:
        srv.wait_ready()
        with srv.admin() as a:
            models = a.get("/admin/models").json()
        assert models["served_version"] == "v1"
        assert any("checksum" in reason for reason in models["refused"].values())
    finally:
        srv.stop()


def test_schema_must_be_current(tmp_path: Path) -> None:
    dep = deploy(f"sqlite:///{tmp_path / 'recsys.db'}", tmp_path)
    downgrade(dep.url, "base")
    srv = Server(dep)
    try:
        srv.proc.wait(30)
        assert srv.proc.returncode != 0
        assert "recsys db upgrade" in srv.logs()
    finally:
        srv.stop()


def _hammer(base: str, stop: threading.Event, seen: Counter, failures: list) -> None:
    with httpx.Client(base_url=base, timeout=10.0) as c:
        i = 0
        while not stop.is_set():
            i += 1
            try:
                r = c.get(f"/v1/users/u{i % 50}/recommendations", params={"k": 10})
                if r.status_code != 200 or len(r.json()["items"]) != 10:
                    failures.append((r.status_code, r.text[:200]))
                else:
                    seen[r.json()["model_version"]] += 1
            except httpx.HTTPError as exc:  # a dropped connection is a failure too
                failures.append(repr(exc))


def test_hot_swap_under_load_drops_nothing_and_refuses_a_corrupt_checkpoint(tmp_path: Path) -> None:
    dep = deploy(f"sqlite:///{tmp_path / 'recsys.db'}", tmp_path)
    srv = Server(dep, poll=0.2)
    try:
        srv.wait_ready()
        stop, seen, failures = threading.Event(), Counter(), []
        threads = [threading.Thread(target=_hammer, args=(srv.base, stop, seen, failures)) for _ in range(4)]
        for t in threads:
            t.start()
        time.sleep(0.5)
        # The trainer's way: write a checkpoint, register it, promote it in the database.
        _register(
            dep,
            "v2",
            cluster_checkpoint(dep.checkpoints, dep.frame, "v2", watermark=None, seed=1),
            promote=True,
        )
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline and seen["v2"] < 50:
            time.sleep(0.1)
        # A broken checkpoint promoted behind the service's back is refused; v2 keeps serving.
        bad = cluster_checkpoint(dep.checkpoints, dep.frame, "v3", watermark=None, seed=2)
        _corrupt(bad)
        _register(dep, "v3", bad, promote=True)
        time.sleep(1.0)
        stop.set()
        for t in threads:
            t.join()
        assert not failures, failures[:5]
        assert seen["v1"] > 0 and seen["v2"] >= 50 and "v3" not in seen, seen
        with srv.admin() as a:
            models = a.get("/admin/models").json()
            assert models["served_version"] == "v2"
            assert "checksum" in models["refused"][str(bad.resolve())]
            refused = assert_error(a.post("/admin/reload"), 409, "checkpoint_refused")
            assert refused["error"]["details"] == {"served_version": "v2"}
            # Promotion through the API checks the checkpoint first and changes nothing when it is broken.
            assert_error(a.post("/admin/models/v3/promote"), 409, "checkpoint_refused")
            # Promoting a good version again serves it at once.
            assert a.post("/admin/models/v1/promote").json()["model_version"] == "v1"
        with srv.client() as c:
            assert c.get("/readyz").json()["model_version"] == "v1"
        assert "checkpoint refused" in srv.logs()
    finally:
        srv.stop()


def test_pinned_checkpoint_until_a_newer_promotion(tmp_path: Path) -> None:
    """`recsys serve --checkpoint DIR` wins over the promoted version, until something is promoted later."""
    dep = deploy(f"sqlite:///{tmp_path / 'recsys.db'}", tmp_path)
    pinned = cluster_checkpoint(tmp_path / "elsewhere", dep.frame, "pinned", watermark=None, seed=4)
    srv = Server(dep, poll=0.2, checkpoint=pinned)
    try:
        srv.wait_ready()
        with srv.client() as c:
            assert c.get("/readyz").json()["model_version"] == "pinned"
            time.sleep(0.5)  # polls see the promoted v1, which was promoted before start-up: no change
            assert c.get("/readyz").json()["model_version"] == "pinned"
            _register(
                dep, "v2", cluster_checkpoint(dep.checkpoints, dep.frame, "v2", watermark=None), promote=True
            )
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline and c.get("/readyz").json()["model_version"] != "v2":
                time.sleep(0.1)
            assert c.get("/readyz").json()["model_version"] == "v2"
    finally:
        srv.stop()


def test_admin_rollback_serves_the_previous_version(tmp_path: Path) -> None:
    """The registry's one rollback (as `recsys models rollback`): v1 back, v2 rejected, served at once."""
    dep = deploy(f"sqlite:///{tmp_path / 'recsys.db'}", tmp_path)
    _register(dep, "v2", cluster_checkpoint(dep.checkpoints, dep.frame, "v2", watermark=None, seed=1), promote=True)
    srv = Server(dep)
    try:
        srv.wait_ready()
        with srv.admin() as a:
            assert a.get("/admin/models").json()["served_version"] == "v2"
            back = a.post("/admin/models/rollback").json()
            assert back["model_version"] == "v1" and back["rejected_version"] == "v2" and back["changed"] is True
            statuses = {m["version"]: m["status"] for m in a.get("/admin/models").json()["models"]}
            assert statuses == {"v1": "promoted", "v2": "rejected"}
            again = assert_error(a.post("/admin/models/rollback"), 409, "nothing_to_roll_back")
            assert "only version ever promoted" in again["error"]["message"]
        with srv.client() as c:
            assert c.get("/readyz").json()["model_version"] == "v1"
    finally:
        srv.stop()


def test_a_pinned_checkpoint_root_serves_its_newest_version(tmp_path: Path) -> None:
    """`recsys train --out DIR` writes DIR/<version>/: DIR itself can be served (its newest valid version)."""
    dep = deploy(f"sqlite:///{tmp_path / 'recsys.db'}", tmp_path, promote=False)
    root = tmp_path / "trained"
    cluster_checkpoint(root, dep.frame, "a-older", watermark=None, seed=2)
    cluster_checkpoint(root, dep.frame, "b-newer", watermark=None, seed=3)
    _corrupt(cluster_checkpoint(root, dep.frame, "c-broken", watermark=None, seed=4))
    srv = Server(dep, checkpoint=root)
    try:
        srv.wait_ready()
        with srv.client() as c:
            assert c.get("/readyz").json()["model_version"] == "b-newer"
    finally:
        srv.stop()


def test_a_pinned_checkpoint_that_cannot_be_served_stops_start_up(tmp_path: Path) -> None:
    dep = deploy(f"sqlite:///{tmp_path / 'recsys.db'}", tmp_path)
    broken = cluster_checkpoint(tmp_path / "elsewhere", dep.frame, "broken", watermark=None)
    _corrupt(broken)
    for pinned, reason in ((broken, "fails its checksum"), (tmp_path / "empty", "not a checkpoint directory")):
        srv = Server(dep, checkpoint=pinned)
        try:
            assert srv.proc.wait(30) != 0  # exits instead of running without ever becoming ready
            assert "the pinned checkpoint cannot be served" in srv.logs() and reason in srv.logs()
        finally:
            srv.stop()
