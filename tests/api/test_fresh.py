"""Fresh user vectors (#16): a known user's list follows what they just did, without a retrain.

Real uvicorn servers (two workers where freshness across workers matters) on checkpoints the trainer
wrote from the planted-cluster log of trainer.synth, plus an old-format and a free-tower checkpoint.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pandas as pd
import pytest
from api_support import Deployment, Server, cluster_checkpoint, load_log, train_checkpoint

from app.db.engine import make_engine
from app.db.events import max_event_id
from app.db.migrate import upgrade
from app.serving.model import load_model
from trainer.synth import SynthSpec, generate

SPEC = SynthSpec(users=400, items=300, events=12_000, seed=11)
VIEW_INTERVAL = 0.25  # app.api.recent.RecentEventsView's default poll


def _uid() -> str:
    return uuid.uuid4().hex[:10]


def _site(root: Path, name: str) -> Deployment:
    return load_log(f"sqlite:///{root / (name + '.db')}", root, generate(SPEC))


def _train(dep: Deployment, tower: str, epochs: int = 8) -> Path:
    """The trainer's pipeline on the database's events (torch in the test process; servers stay torch-free)."""
    return train_checkpoint(dep.url, dep.data_dir / f"checkpoints-{tower}", None, tower=tower, epochs=epochs)[0]


@pytest.fixture(scope="module")
def pooled(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Server, Path]]:
    """Two workers serving a pooled-tower model, polling for models off (so a PUT stays on its worker)."""
    dep = _site(tmp_path_factory.mktemp("fresh"), "recsys")
    path = _train(dep, "pooled")
    server = Server(dep, checkpoint=path, workers=2)
    try:
        server.wait_ready(60)
        yield server, path
    finally:
        server.stop()


def _clusters(frame: pd.DataFrame) -> tuple[np.ndarray, np.ndarray, int]:
    uc, ic = frame.attrs["user_cluster"], frame.attrs["item_cluster"]
    return uc, ic, int(ic.max()) + 1


def _items(client: httpx.Client, user: str, **params: object) -> tuple[list[str], dict]:
    resp = client.get(f"/v1/users/{user}/recommendations", params={"k": 10, **params})
    assert resp.status_code == 200, resp.text
    body = resp.json()
    return [i["item_id"] for i in body["items"]], body


def _share(items: list[str], ic: np.ndarray, cluster: int) -> float:
    return float(np.mean([ic[int(i[1:])] == cluster for i in items])) if items else 0.0


def _like(client: httpx.Client, user: str, items: list[str], kind: str = "like") -> None:
    now = time.time()
    batch = [
        {"event_id": f"{_uid()}-{it}", "user_id": user, "item_id": it, "type": kind, "timestamp": now + n}
        for n, it in enumerate(items)
    ]
    resp = client.post("/v1/events", json=batch)
    assert resp.status_code == 200 and resp.json()["accepted"] == len(items), resp.text


def _workers(server: Server, n: int = 8) -> list[list[httpx.Client]]:
    """Keep-alive connections grouped by the worker that holds them: an item hidden through the first one
    (model polling is off, so only that worker knows) disappears from the similar lists of its group.

    Which worker accepts a connection is the kernel's and the event loops' choice (the workers share one
    listening socket, and a busy loop leaves a burst to the other): connections are added, ``n`` at a
    time, until both workers hold some. Each round probes another item: a worker still loading its model
    during a round reads that round's item as hidden and, polling off, keeps it so (until the un-hide
    through one of its own connections at the end); probing it again would put that worker's
    connections in the first group every round."""
    clients: list[httpx.Client] = []
    probed: list[str] = []
    deadline = time.monotonic() + 60
    while True:
        fresh = [server.client() for _ in range(n)]
        for c in fresh:  # each keep-alive connection stays on its worker: wait until that worker has the model
            while c.get("/readyz").status_code != 200:
                assert time.monotonic() < deadline, "a worker never became ready"
                time.sleep(0.1)
        clients += fresh
        groups = _by_worker(clients, f"i{len(probed)}", probed)
        if groups[0] and groups[1]:
            for item in probed:
                assert groups[1][0].put(f"/v1/items/{item}", json={"hidden": False}).status_code == 200
            return groups
        assert time.monotonic() < deadline, f"two workers, but all {len(clients)} connections went to one"
        time.sleep(0.5)


def _by_worker(clients: list[httpx.Client], probe_of: str, probed: list[str]) -> list[list[httpx.Client]]:
    """[the clients on the first client's worker, the others], told apart by hiding the item most similar
    to ``probe_of`` through the first (added to ``probed``) and un-hiding it there afterwards."""
    hidden = clients[0].get(f"/v1/items/{probe_of}/similar", params={"k": 20}).json()["items"][0]["item_id"]
    resp = clients[0].put(f"/v1/items/{hidden}", json={"hidden": True})
    assert resp.status_code == 200, resp.text
    probed.append(hidden)
    groups: dict[bool, list[httpx.Client]] = {True: [], False: []}
    for c in clients:
        got = {i["item_id"] for i in c.get(f"/v1/items/{probe_of}/similar", params={"k": 20}).json()["items"]}
        groups[hidden not in got].append(c)
    assert clients[0].put(f"/v1/items/{hidden}", json={"hidden": False}).status_code == 200
    return [groups[True], groups[False]]


def test_three_likes_of_another_cluster_move_the_next_list_on_every_worker(pooled: tuple[Server, Path]) -> None:
    server, _ = pooled
    uc, ic, k = _clusters(server.dep.frame)
    seen = server.dep.frame.groupby("user_id")["item_id"].agg(set)
    here, there = _workers(server)
    rng = np.random.default_rng(1)
    picked: dict[str, tuple[int, list[str]]] = {}
    for u in rng.permutation(len(uc)):
        user, target = f"u{u}", int((uc[u] + 1) % k)
        items, body = _items(here[0], user)
        if body["source"] == "model" and _share(items, ic, target) < 0.1:
            fresh = [f"i{j}" for j in np.flatnonzero(ic == target) if f"i{j}" not in seen[user]]
            picked[user] = (target, [str(i) for i in rng.choice(fresh, 3, replace=False)])
        if len(picked) == 12:
            break
    assert len(picked) == 12

    shares, posted = [], {}
    for user, (target, liked) in picked.items():
        _like(here[0], user, liked)
        posted[user] = time.monotonic()
        items, body = _items(here[0], user)  # the worker that took the events: at once
        assert body["source"] == "model+recent" and len(items) == 10 and not set(liked) & set(items)
        shares.append(_share(items, ic, target))
    assert np.mean(shares) >= 0.3, shares

    time.sleep(VIEW_INTERVAL * 2 + 0.2)  # a poll interval (and a read) later, the other worker too
    for client in there:
        other = [_share(_items(client, user)[0], ic, target) for user, (target, _) in picked.items()]
        assert np.mean(other) >= 0.3, other
        assert all(_items(client, user)[1]["source"] == "model+recent" for user in picked)


def test_the_answering_worker_sees_the_events_the_other_one_took_within_a_poll(
    pooled: tuple[Server, Path],
) -> None:
    server, _ = pooled
    here, there = _workers(server, 12)
    uc, ic, k = _clusters(server.dep.frame)
    user = "u3"
    target = int((uc[3] + 1) % k)
    fresh = [f"i{j}" for j in np.flatnonzero(ic == target)][:5]
    before, _ = _items(there[0], user)
    _like(here[0], user, fresh)
    start = time.monotonic()
    while _items(there[0], user)[1]["source"] != "model+recent":
        assert time.monotonic() - start < VIEW_INTERVAL * 4, "the other worker did not follow within a poll"
        time.sleep(0.02)
    metrics = here[0].get("/metrics").text
    assert "recsys_recent_events_view_lag_seconds_bucket" in metrics
    assert "recsys_recent_events_view_read_timestamp_seconds" in metrics


def test_dislikes_since_the_watermark_lower_those_items_and_are_never_served(pooled: tuple[Server, Path]) -> None:
    server, path = pooled
    model = load_model(path, wait=True)
    _, ic, _ = _clusters(server.dep.frame)
    with server.client() as client:
        # a user with positives outside their home cluster: disliking them takes them out of the pool
        for user in model.ckpt.user_ids:
            row = model.user_row(user)
            held = model.item_ids[model.positive_rows(row)].tolist()
            clusters = pd.Series([ic[int(i[1:])] for i in held]).value_counts()
            if len(held) <= 15 and len(clusters) > 1 and clusters.iloc[-1] >= 2:
                break
        off = int(clusters.index[-1])
        disliked = [i for i in held if ic[int(i[1:])] == off]
        region = [f"i{j}" for j in np.flatnonzero(ic == off)]
        params = {"k": len(region), "only": ",".join(region), "exclude_seen": "false"}
        before = {i["item_id"]: i["score"] for i in _items(client, user, **params)[1]["items"]}
        assert set(disliked) <= set(before)  # with exclude_seen=false their own positives can be served
        _like(client, user, disliked, kind="dislike")
        after_items, body = _items(client, user, **params)
        assert body["source"] == "model+recent"
        after = {i["item_id"]: i["score"] for i in body["items"]}
        assert not set(disliked) & set(after)  # never served, seen items allowed or not
        common = [i for i in after if i in before]
        assert np.mean([after[i] - before[i] for i in common]) < 0, "the disliked region did not go down"
        for extra in ({}, {"explain": "true"}, {"exclude_seen": "false"}, {"k": 100}):
            items, body = _items(client, user, **extra)
            assert not set(disliked) & set(items), extra
            if "explain" in extra:
                named = {b["item_id"] for it in body["items"] for b in it["because"]}
                assert not set(disliked) & named


def test_new_events_on_unknown_items_keep_the_trained_list(pooled: tuple[Server, Path]) -> None:
    server, _ = pooled
    with server.client() as client:
        before, body = _items(client, "u5")
        assert body["source"] == "model"
        _like(client, "u5", [f"new-{_uid()}" for _ in range(3)])
        after, body = _items(client, "u5")
        assert body["source"] == "model" and after == before
        after, body = _items(client, "u5", explain="true")
        assert body["source"] == "model" and after == before


def test_explanations_name_the_new_events(pooled: tuple[Server, Path]) -> None:
    server, _ = pooled
    uc, ic, k = _clusters(server.dep.frame)
    seen = server.dep.frame.groupby("user_id")["item_id"].agg(set)
    user = "u11"
    target = int((uc[11] + 1) % k)
    liked = [f"i{j}" for j in np.flatnonzero(ic == target) if f"i{j}" not in seen[user]][:4]
    with server.client() as client:
        _like(client, user, liked)
        items, body = _items(client, user, explain="true")
        assert body["source"] == "model+recent"
        shifted = [it for it in body["items"] if ic[int(it["item_id"][1:])] == target]
        assert shifted, "no item of the liked cluster in the list"
        for it in shifted:
            assert it["because"] and it["because"][0]["item_id"] in liked, it


def test_the_fresh_rule_with_nothing_new_is_the_precomputed_list(pooled: tuple[Server, Path]) -> None:
    _, path = pooled
    model = load_model(path, wait=True)
    assert model.pooled and model.top is not None
    for row in range(0, len(model.ckpt.user_ids), 17):
        fresh = model.query_vector(row, [], [])
        assert fresh is not None
        np.testing.assert_allclose(fresh, model.user_vector(row), rtol=1e-5, atol=1e-5)
        listed = model.from_top_list(row, 10, [])
        searched = model.search(fresh, 10, model.seen_rows(row))
        assert listed is not None and listed.rows.tolist() == searched.rows.tolist()


@pytest.mark.parametrize("kind", ["free", "old"])
def test_free_tower_and_old_checkpoints_still_answer(tmp_path: Path, kind: str) -> None:
    dep = _site(tmp_path, kind)
    if kind == "free":
        path = _train(dep, "free", epochs=3)
    else:
        engine = make_engine(dep.url)
        with engine.connect() as conn:
            watermark = max_event_id(conn)
        engine.dispose()
        path = cluster_checkpoint(tmp_path / "checkpoints-old", dep.frame, "v1", watermark=watermark)
    uc, ic, k = _clusters(dep.frame)
    seen = dep.frame.groupby("user_id")["item_id"].agg(set)
    server = Server(dep, checkpoint=path)
    try:
        server.wait_ready(60)
        with server.client() as client:
            user = "u2"
            target = int((uc[2] + 1) % k)
            liked = [f"i{j}" for j in np.flatnonzero(ic == target) if f"i{j}" not in seen[user]][:3]
            region = [f"i{j}" for j in np.flatnonzero(ic == target) if f"i{j}" not in liked]
            only = {"only": ",".join(region), "k": len(region)}

            def scores() -> dict[str, float]:
                return {i["item_id"]: i["score"] for i in _items(client, user, **only)[1]["items"]}

            _, body = _items(client, user)
            assert body["source"] == "model"
            before = scores()
            _like(client, user, liked)
            for params in ({}, {"explain": "true"}, {"exclude_seen": "false"}, {"category": "none"}):
                after, body = _items(client, user, **params)
                assert body["source"] == "model+recent", params
                assert len(after) == (0 if params.get("category") else 10), params
                if "exclude_seen" not in params:  # seen since the watermark: left out unless allowed
                    assert not set(liked) & set(after), params
            after = scores()  # the liked cluster moved up (the blend pulled the vector towards it)
            assert np.mean([after[i] - before[i] for i in after if i in before]) > 0
            cold = f"cold-{_uid()}"
            _like(client, cold, liked[:2])
            assert _items(client, cold)[1]["source"] == "fold_in"
            assert _items(client, f"nobody-{_uid()}")[1]["source"] == "popular"
    finally:
        server.stop()


def test_the_view_tells_positives_from_negatives(tmp_path: Path) -> None:
    from app.api.recent import RecentEventsView
    from app.db.events import insert_event_rows

    url = f"sqlite:///{tmp_path / 'view.db'}"
    upgrade(url)
    engine = make_engine(url)
    rows = [("u1", "i1", "click"), ("u1", "i2", "dislike"), ("u1", "i1", "skip"), ("u2", "i3", "like")]
    with engine.begin() as conn:
        insert_event_rows(conn, [
            {"event_id": f"e{n}", "user_id": u, "item_id": i, "type": t, "value": None, "timestamp": 1.0}
            for n, (u, i, t) in enumerate(rows)
        ])
    view = RecentEventsView(engine, negative_types={"dislike", "skip"})
    try:
        view._rebuild(0)
        assert view.events_for("u1", 0) == (["i2", "i1"], ["i1"], ["i2", "i1"])  # newest first
        assert view.events_for("u2", 0) == (["i3"], ["i3"], []) and view.events_for("nobody", 0) == ([], [], [])
        assert view.events_for("u1", -1) is None  # a model older than the view's watermark: ask the database
        view.add_committed([(10, "u2", "i4", "dislike"), (11, "u3", "i5", "purchase")])  # this worker's own, at once
        assert view.events_for("u2", 0) == (["i4", "i3"], ["i3"], ["i4"])
        assert view.events_for("u3", 0) == (["i5"], ["i5"], []) and view.items_for("u3", 0) == ["i5"]
    finally:
        engine.dispose()
