"""Request-time filters (exclude, only, category), hidden items via PUT, and explanations, on a real server.

Also the filtered FAISS search itself, in-process, on a catalogue large enough to go through the
IDSelector path (the test deployment's 400 items are always scored exactly).
"""

from __future__ import annotations

import time
import uuid
from pathlib import Path

import faiss
import numpy as np
import pytest
from api_support import Server, assert_error
from scipy import sparse

from app.serving.model import EXACT_MAX, load_model
from trainer.checkpoint import read_checkpoint, write_checkpoint


def _ids(body: dict) -> list[str]:
    return [i["item_id"] for i in body["items"]]


def _seen(server: Server, user: str) -> set[str]:
    frame = server.dep.frame
    return set(frame.loc[frame.user_id == user, "item_id"])


def test_exclude_returns_exactly_k_never_an_excluded_item(server: Server) -> None:
    with server.client() as c:
        base = _ids(c.get("/v1/users/u11/recommendations", params={"k": 15}).json())
        excluded = base[:5]
        params = [
            ("k", 10),
            ("exclude", ",".join(excluded[:3])),
            ("exclude", excluded[3]),
            ("exclude", excluded[4]),
        ]
        got = _ids(c.get("/v1/users/u11/recommendations", params=params).json())
        assert got == base[5:15]  # the same ranking with the excluded items taken out, still k long
        item = server.dep.item_ids[10]
        sim = _ids(c.get(f"/v1/items/{item}/similar", params={"k": 12}).json())
        got = _ids(c.get(f"/v1/items/{item}/similar", params={"k": 8, "exclude": ",".join(sim[:4])}).json())
        assert got == sim[4:12]


def test_only_smaller_than_k_returns_every_valid_candidate(server: Server) -> None:
    seen = sorted(_seen(server, "u12"))
    unseen = [i for i in server.dep.item_ids if i not in seen]
    only = [*unseen[:4], seen[0], "no-such-item"]
    with server.client() as c:
        body = c.get("/v1/users/u12/recommendations", params={"k": 10, "only": ",".join(only)}).json()
        assert sorted(_ids(body)) == sorted(unseen[:4])  # the seen item and the unknown id are not valid
        scores = [i["score"] for i in body["items"]]
        assert scores == sorted(scores, reverse=True)
        # A larger `only` set: exactly k, all inside it; `exclude` and `only` intersect.
        pool = unseen[:60]
        got = _ids(
            c.get(
                "/v1/users/u12/recommendations",
                params=[("k", 10), ("only", ",".join(pool)), ("exclude", pool[0]), ("exclude", pool[1])],
            ).json()
        )
        assert len(got) == 10 and set(got) <= set(pool[2:])
        # Cold users (popular path) and fold-in users are filtered the same way.
        cold = c.get(
            f"/v1/users/cold-{uuid.uuid4().hex}/recommendations", params={"k": 10, "only": ",".join(pool[:3])}
        )
        assert cold.json()["source"] == "popular" and sorted(_ids(cold.json())) == sorted(pool[:3])
        empty = c.get("/v1/users/u12/recommendations", params={"only": "no-such-item"}).json()
        assert empty["items"] == []


def test_category_filter_and_hidden_via_put(server: Server) -> None:
    cat = "cat-" + uuid.uuid4().hex[:8]
    seen = _seen(server, "u13")
    members = [i for i in server.dep.item_ids if i not in seen][:6]
    with server.client() as c:
        for n, item in enumerate(members):
            attrs = {"categories": ["x", cat]} if n % 2 else {"category": cat, "title": f"t{n}"}
            r = c.put(f"/v1/items/{item}", json={"attributes": attrs})
            assert r.status_code == 200 and r.json()["attributes"] == attrs
        hidden = members[0]
        r = c.put(f"/v1/items/{hidden}", json={"hidden": True})
        assert r.json()["hidden"] is True and r.json()["attributes"]["category"] == cat  # attributes kept
        try:
            body = c.get("/v1/users/u13/recommendations", params={"k": 10, "category": cat}).json()
            assert sorted(_ids(body)) == sorted(members[1:])  # every visible member, nothing else
            top = c.get("/v1/users/u13/recommendations", params={"k": 3, "category": cat}).json()
            assert _ids(top) == _ids(body)[:3]
            query = members[1]
            sim = _ids(c.get(f"/v1/items/{query}/similar", params={"k": 50, "category": cat}).json())
            assert sorted(sim) == sorted(members[2:])
            assert (
                c.get("/v1/users/u13/recommendations", params={"category": "nope-" + cat}).json()["items"]
                == []
            )
            # Re-categorising an item takes effect at once on this worker.
            c.put(f"/v1/items/{members[2]}", json={"attributes": {"category": "other"}})
            sim = _ids(c.get(f"/v1/items/{query}/similar", params={"k": 50, "category": cat}).json())
            assert sorted(sim) == sorted(members[3:])
        finally:
            c.put(f"/v1/items/{hidden}", json={"hidden": False})
            for item in members:
                c.put(f"/v1/items/{item}", json={"attributes": {}})


def test_put_hidden_removes_items_at_once(server: Server) -> None:
    probe = server.dep.item_ids[20]
    with server.client() as c:
        recs = _ids(c.get("/v1/users/u14/recommendations", params={"k": 5}).json())
        sim = _ids(c.get(f"/v1/items/{probe}/similar", params={"k": 5}).json())
        targets = sorted(set(recs[:2] + sim[:2]))
        try:
            for item in targets:
                assert c.put(f"/v1/items/{item}", json={"hidden": True}).json()["hidden"] is True
            for params in ({"k": 50}, {"k": 50, "exclude": "i0"}):  # unfiltered and filtered search paths
                after = _ids(c.get("/v1/users/u14/recommendations", params=params).json())
                assert len(after) == 50 and not set(after) & set(targets)
                after = _ids(c.get(f"/v1/items/{probe}/similar", params=params).json())
                assert len(after) == 50 and not set(after) & set(targets)
            assert c.get(f"/v1/items/{targets[0]}").json()["hidden"] is True
        finally:
            for item in targets:
                c.put(f"/v1/items/{item}", json={"hidden": False})
        assert recs[0] in _ids(c.get("/v1/users/u14/recommendations", params={"k": 5}).json())


def test_explanations_name_items_the_user_interacted_with(server: Server) -> None:
    ckpt = read_checkpoint(server.dep.checkpoints / server.dep.version)
    emb = np.asarray(ckpt.item_embeddings)
    row = ckpt.user_row["u15"]
    history = ckpt.seen.indices[ckpt.seen.indptr[row] : ckpt.seen.indptr[row + 1]]  # no events since
    with server.client() as c:
        body = c.get("/v1/users/u15/recommendations", params={"k": 5, "explain": "true"}).json()
        plain = c.get("/v1/users/u15/recommendations", params={"k": 5}).json()
    assert _ids(body) == _ids(plain) and all("because" not in i for i in plain["items"])
    for item in body["items"]:
        because = item["because"]
        assert 1 <= len(because) <= 3
        assert {b["item_id"] for b in because} <= _seen(server, "u15")
        sims = emb[history] @ emb[ckpt.item_row[item["item_id"]]]
        best = np.sort(sims)[::-1][: len(because)]
        assert np.allclose([b["contribution"] for b in because], best, atol=1e-4)
    with server.client() as c:
        cold = c.get(f"/v1/users/cold-{uuid.uuid4().hex}/recommendations", params={"explain": True}).json()
        assert cold["source"] == "popular" and all(i["because"] == [] for i in cold["items"])
        user = "fold-" + uuid.uuid4().hex[:8]
        liked = server.dep.item_ids[30:33]
        events = [
            {"event_id": uuid.uuid4().hex, "user_id": user, "item_id": i, "type": "like"} for i in liked
        ]
        c.post("/v1/events", json=events)
        warm = c.get(f"/v1/users/{user}/recommendations", params={"explain": True, "k": 5}).json()
    assert warm["source"] == "fold_in"
    named = {b["item_id"] for i in warm["items"] for b in i["because"]}
    assert named and named <= set(liked)


def test_bad_filters_answer_422_with_the_error_shape(server: Server) -> None:
    ids = [f"i{j}" for j in range(1001)]
    chunks = [",".join(ids[j : j + 100]) for j in range(0, 1001, 100)]  # 11 values, each < 512 characters
    with server.client() as c:
        ok = c.get("/v1/users/u1/recommendations", params=[("exclude", v) for v in chunks[:10]])
        assert ok.status_code == 200  # 1000 ids: the limit
        many = [("exclude", v) for v in chunks]
        body = assert_error(c.get("/v1/users/u1/recommendations", params=many), 422, "too_many_ids")
        assert body["error"]["details"][0]["loc"] == ["query", "exclude"]
        only = [("only", v) for v in chunks]
        assert_error(c.get("/v1/items/i1/similar", params=only), 422, "too_many_ids")
        long_value = ",".join(ids[:150])  # more than 512 characters in one value
        assert_error(c.get("/v1/items/i1/similar", params={"exclude": long_value}), 422, "validation_error")
        repeated = [("exclude", "i1")] * 51  # more than 50 repetitions
        assert_error(c.get("/v1/users/u1/recommendations", params=repeated), 422, "validation_error")
        assert_error(c.get("/v1/users/u1/recommendations", params={"category": ""}), 422, "validation_error")
        assert_error(c.get("/v1/users/u1/recommendations", params={"explain": "maybe"}), 422)


@pytest.fixture(scope="module")
def big_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    rng = np.random.default_rng(3)
    n_items, n_users, dim = 3 * EXACT_MAX, 5, 16
    seen = sparse.random(n_users, n_items, density=0.01, format="csr", random_state=1, dtype=np.float32)
    seen.data[:] = 1
    return write_checkpoint(
        tmp_path_factory.mktemp("big"),
        version="big1",
        user_embeddings=rng.normal(size=(n_users, dim)).astype(np.float32),
        item_embeddings=rng.normal(size=(n_items, dim)).astype(np.float32),
        user_ids=[f"u{j}" for j in range(n_users)],
        item_ids=[f"i{j}" for j in range(n_items)],
        item_popularity=rng.integers(1, 100, n_items),
        seen=seen,
    )


def test_filtered_search_through_faiss_matches_brute_force(big_checkpoint: Path) -> None:
    rng = np.random.default_rng(5)
    model = load_model(big_checkpoint, hidden_ids=[f"i{j}" for j in range(0, 3 * EXACT_MAX, 7)])
    emb = np.asarray(model.ckpt.item_embeddings)
    exact = model.index
    hnsw = faiss.IndexHNSWFlat(emb.shape[1], 8, faiss.METRIC_INNER_PRODUCT)
    hnsw.hnsw.efSearch = 16  # deliberately poor recall under a strict filter: the exact completion kicks in
    hnsw.add(emb)
    for index in (exact, hnsw):
        model.index = index
        for trial in range(6):
            vector = model.user_vector(trial % 5)
            exclude = rng.choice(len(emb), 2000, replace=False)
            only = None if trial % 2 else rng.choice(len(emb), EXACT_MAX + 500 + trial, replace=False)
            mask = model.valid_mask(exclude, only)
            valid = np.flatnonzero(mask)
            truth = valid[np.argsort(-(emb[valid] @ vector), kind="stable")][:50]
            got = model.search_filtered(vector, 50, exclude, only)
            assert len(got.rows) == 50 and mask[got.rows].all()
            if index is exact:
                assert list(got.rows) == list(truth)
            else:
                assert len(set(got.rows) & set(truth)) >= 25  # approximate, but never an invalid row
        tiny = rng.choice(len(emb), 5, replace=False)
        got = model.search_filtered(model.user_vector(0), 50, [], tiny)
        assert sorted(got.rows) == sorted(r for r in tiny if not model.hidden[r])


def test_disliked_items_stay_out_with_exclude_seen_false(server: Server) -> None:
    """A dislike recorded after the model was trained is never recommended, even with exclude_seen=false."""
    cold = "cold-" + uuid.uuid4().hex[:8]
    with server.client() as c:
        for user in ("u16", cold):
            params = {"k": 5, "exclude_seen": "false"}
            first = _ids(c.get(f"/v1/users/{user}/recommendations", params=params).json())[0]
            event = {"event_id": uuid.uuid4().hex, "user_id": user, "item_id": first, "type": "dislike"}
            assert c.post("/v1/events", json=event).json()["accepted"] == 1
            for extra in ({}, {"exclude": "i0"}):
                after = _ids(c.get(f"/v1/users/{user}/recommendations", params={**params, **extra}).json())
                assert len(after) == 5 and first not in after


def test_other_workers_follow_a_put_within_a_poll(server: Server) -> None:
    """A second server over the same database (polling every 0.3 s) sees another worker's PUT."""
    cat = "cat-" + uuid.uuid4().hex[:8]
    with server.client() as c:
        target = _ids(c.get("/v1/users/u17/recommendations", params={"k": 3}).json())[0]
    member = next(i for i in reversed(server.dep.item_ids) if i not in _seen(server, "u17") and i != target)
    other = Server(server.dep, poll=0.3)
    try:
        other.wait_ready()
        with server.client() as c:
            c.put(f"/v1/items/{target}", json={"hidden": True, "attributes": {"category": cat}})
            c.put(f"/v1/items/{member}", json={"attributes": {"category": cat}})
        deadline = time.monotonic() + 10
        with other.client() as o:
            while time.monotonic() < deadline:
                recs = _ids(o.get("/v1/users/u17/recommendations", params={"k": 3}).json())
                in_cat = _ids(o.get("/v1/users/u17/recommendations", params={"category": cat}).json())
                if target not in recs and in_cat:
                    break
                time.sleep(0.1)
        assert target not in recs and in_cat == [member]
    finally:
        other.stop()
        with server.client() as c:
            c.put(f"/v1/items/{target}", json={"hidden": False, "attributes": {}})
            c.put(f"/v1/items/{member}", json={"attributes": {}})
