"""Happy paths of the public API against a real server: recommendations, exclusion, fallbacks, events."""

from __future__ import annotations

import re
import time
import uuid

import numpy as np
import pandas as pd
from api_support import Server
from sqlalchemy import select, update

from app.db.engine import make_engine
from app.db.events import insert_events
from app.db.impressions import decode_item_ids
from app.db.models import Event, Impression, Item, User
from trainer.checkpoint import read_checkpoint


def _uid() -> str:
    return "t-" + uuid.uuid4().hex[:12]


def test_health_and_ready(server: Server) -> None:
    with server.client() as c:
        assert c.get("/healthz").json() == {"status": "ok"}
        ready = c.get("/readyz")
        assert ready.status_code == 200 and ready.json() == {"status": "ready", "model_version": "v1"}


def _quiet_users(server: Server, n: int = 1) -> list[str]:
    """Model users with no event after the checkpoint's watermark (other tests share this server and post
    events; a user who has some gets a vector remade from them, source ``model+recent``)."""
    ckpt = read_checkpoint(server.dep.checkpoints / server.dep.version)
    engine = make_engine(server.dep.url)
    with engine.connect() as conn:
        busy = set(conn.execute(select(User.external_id).join(Event, Event.user_id == User.id)
                                .where(Event.id > (ckpt.watermark or 0))).scalars())
    engine.dispose()
    return [u for u in ckpt.user_ids if u not in busy][::7][:n]


def test_recommendations_for_a_known_user_exclude_seen_items(server: Server) -> None:
    frame = server.dep.frame
    user = _quiet_users(server)[0]
    seen = set(frame.loc[frame.user_id == user, "item_id"])
    with server.client() as c:
        body = c.get(f"/v1/users/{user}/recommendations", params={"k": 20}).json()
        assert body["source"] == "model" and body["model_version"] == "v1" and body["user_id"] == user
        items = [i["item_id"] for i in body["items"]]
        assert len(items) == 20 and not seen & set(items) and set(items) <= set(server.dep.item_ids)
        scores = [i["score"] for i in body["items"]]
        assert scores == sorted(scores, reverse=True)
        assert [i["rank"] for i in body["items"]] == list(range(1, 21))
        everything = c.get(f"/v1/users/{user}/recommendations", params={"k": 1000, "exclude_seen": False}).json()
    # k beyond the catalogue: all of it, except the user's explicit negatives in the checkpoint (never served)
    ckpt = read_checkpoint(server.dep.checkpoints / server.dep.version)
    feedback = getattr(ckpt, "feedback", None)
    row = ckpt.user_row[user]
    negatives = set() if feedback is None else {ckpt.item_ids[j] for j in feedback[row].indices}
    got = {i["item_id"] for i in everything["items"]}
    assert len(everything["items"]) == len(server.dep.item_ids) - len(negatives)
    assert not got & negatives and seen - negatives <= got


def _item_ids(server: Server, user: str | None) -> set[str]:
    """Items the user has any event for (before or after the model's watermark); None: hidden items."""
    engine = make_engine(server.dep.url)
    query = select(Item.external_id)
    if user is None:
        query = query.where(Item.hidden.is_(True))
    else:
        query = query.join(Event, Event.item_id == Item.id).join(User, User.id == Event.user_id)
        query = query.where(User.external_id == user)
    try:
        with engine.connect() as conn:
            return set(conn.execute(query).scalars())
    finally:
        engine.dispose()


def test_served_lists_are_the_models_exact_top_k(server: Server) -> None:
    """Once the top lists are built, what is served is the checkpoint's own ranking, computed here with
    numpy: dot products, hidden items, checkpoint seen items, explicit negatives and the user's events left
    out; for similar items, the item itself and hidden items."""
    with server.client() as c:
        deadline = time.monotonic() + 30
        while not re.search(r"^recsys_serving_top_lists(\{[^}]*\})? 1\.0$", c.get("/metrics").text, re.M):
            assert time.monotonic() < deadline, "top lists never became ready"
            time.sleep(0.1)
        ckpt = read_checkpoint(server.dep.checkpoints / server.dep.version)
        users = np.asarray(ckpt.user_embeddings)
        items = np.asarray(ckpt.item_embeddings)
        feedback = getattr(ckpt, "feedback", None)
        hidden = {ckpt.item_row[i] for i in _item_ids(server, None)}
        for user in _quiet_users(server, 5):  # the trained vector's ranking (users with new events: test_fresh)
            row = ckpt.user_row[user]
            banned = {int(j) for j in ckpt.seen[row].indices} | hidden
            if feedback is not None:
                banned |= {int(j) for j in feedback[row].indices}
            banned |= {ckpt.item_row[i] for i in _item_ids(server, user)}
            scores = items @ users[row]
            order = [j for j in np.argsort(-scores, kind="stable") if j not in banned][:10]
            body = c.get(f"/v1/users/{user}/recommendations", params={"k": 10}).json()
            assert [i["item_id"] for i in body["items"]] == [ckpt.item_ids[j] for j in order]
            assert np.allclose([i["score"] for i in body["items"]], scores[order], atol=1e-5)
        for item in ("i3", "i77", "i150", "i399"):
            row = ckpt.item_row[item]
            scores = items @ items[row]
            order = [j for j in np.argsort(-scores, kind="stable") if j not in hidden | {row}][:10]
            body = c.get(f"/v1/items/{item}/similar", params={"k": 10}).json()
            assert [i["item_id"] for i in body["items"]] == [ckpt.item_ids[j] for j in order]
            assert np.allclose([i["score"] for i in body["items"]], scores[order], atol=1e-5)


def test_events_since_the_watermark_are_excluded(server: Server) -> None:
    with server.client() as c:
        first = c.get("/v1/users/u2/recommendations", params={"k": 5}).json()["items"][0]["item_id"]
        event = {"event_id": _uid(), "user_id": "u2", "item_id": first, "type": "click"}
        assert c.post("/v1/events", json=event).json()["accepted"] == 1
        after = c.get("/v1/users/u2/recommendations", params={"k": 5}).json()
        assert first not in {i["item_id"] for i in after["items"]}


def test_cold_users_get_popular_items_then_fold_in(server: Server) -> None:
    user = _uid()
    with server.client() as c:
        cold = c.get(f"/v1/users/{user}/recommendations", params={"k": 5}).json()
        assert cold["source"] == "popular" and len(cold["items"]) == 5
        pops = [i["score"] for i in cold["items"]]
        assert pops == sorted(pops, reverse=True)
        liked = server.dep.item_ids[:3]
        batch = [{"event_id": _uid(), "user_id": user, "item_id": i, "type": "like"} for i in liked]
        assert c.post("/v1/events", json=batch).json() == {"received": 3, "accepted": 3, "duplicates": 0}
        warm = c.get(f"/v1/users/{user}/recommendations", params={"k": 5}).json()
        assert warm["source"] == "fold_in" and len(warm["items"]) == 5
        assert not {i["item_id"] for i in warm["items"]} & set(liked)
        # Negative feedback alone gives nothing to fold in: popular items, minus the disliked one.
        other = _uid()
        dislike = {
            "event_id": _uid(),
            "user_id": other,
            "item_id": cold["items"][0]["item_id"],
            "type": "dislike",
        }
        assert c.post("/v1/events", json=dislike).json()["accepted"] == 1
        still_cold = c.get(f"/v1/users/{other}/recommendations", params={"k": 5}).json()
        assert still_cold["source"] == "popular"
        assert cold["items"][0]["item_id"] not in {i["item_id"] for i in still_cold["items"]}


def test_similar_items(server: Server) -> None:
    item = server.dep.item_ids[3]
    with server.client() as c:
        body = c.get(f"/v1/items/{item}/similar", params={"k": 8}).json()
    got = [i["item_id"] for i in body["items"]]
    assert body["item_id"] == item and body["model_version"] == "v1"
    assert len(got) == 8 and item not in got and set(got) <= set(server.dep.item_ids)
    scores = [i["score"] for i in body["items"]]
    assert scores == sorted(scores, reverse=True)


def test_events_are_idempotent_and_counted(server: Server) -> None:
    ids = [_uid() for _ in range(3)]
    batch = [{"event_id": e, "user_id": "u5", "item_id": "i7", "type": "view", "value": 1.5} for e in ids]
    with server.client() as c:
        assert c.post("/v1/events", json=batch).json() == {"received": 3, "accepted": 3, "duplicates": 0}
        again = batch[:2] + [{**batch[0], "event_id": _uid(), "timestamp": 1_700_000_000.5}]
        assert c.post("/v1/events", json=again).json() == {"received": 3, "accepted": 1, "duplicates": 2}
        repeated = [batch[0], batch[0]]
        assert c.post("/v1/events", json=repeated).json() == {"received": 2, "accepted": 0, "duplicates": 2}
        # New users and items are upserted.
        new = {"event_id": _uid(), "user_id": _uid(), "item_id": "brand-new-item", "type": "dislike"}
        assert c.post("/v1/events", json=new).json()["accepted"] == 1


def test_timestamps_may_be_iso_8601_and_are_stored_as_epoch_seconds(server: Server) -> None:
    given = {
        "2026-12-07T10:15:00Z": 1_796_638_500.0,
        "2026-12-07T12:15:00.250+02:00": 1_796_638_500.25,  # the offset is honoured
        "2026-12-07 10:15:00": 1_796_638_500.0,  # no offset: UTC
        "2026-12-07": 1_796_601_600.0,
        1_796_638_500.5: 1_796_638_500.5,  # numbers are still epoch seconds
    }
    ids = {_uid(): (when, stored) for when, stored in given.items()}
    batch = [{"event_id": e, "user_id": "u5", "item_id": "i7", "type": "view", "timestamp": when}
             for e, (when, _) in ids.items()]
    with server.client() as c:
        assert c.post("/v1/events", json=batch).json()["accepted"] == len(batch)
    engine = make_engine(server.dep.url)
    with engine.connect() as conn:
        rows = dict(conn.execute(select(Event.event_id, Event.timestamp).where(Event.event_id.in_(ids))).all())
    engine.dispose()
    assert rows == {e: stored for e, (_, stored) in ids.items()}


def test_hidden_items_are_never_recommended(server: Server) -> None:
    with server.client() as c:
        top = [
            i["item_id"] for i in c.get("/v1/users/nobody-x/recommendations", params={"k": 3}).json()["items"]
        ]
        probe = server.dep.item_ids[3]
        sim = [i["item_id"] for i in c.get(f"/v1/items/{probe}/similar", params={"k": 3}).json()["items"]]
    engine = make_engine(server.dep.url)
    try:
        with engine.begin() as conn:
            conn.execute(update(Item).where(Item.external_id.in_(top + sim)).values(hidden=True))
        with server.admin() as a:  # the hidden set is refreshed by the poller or a reload
            assert a.post("/admin/reload").status_code == 200
        with server.client() as c:
            popular = c.get("/v1/users/nobody-x/recommendations", params={"k": 50}).json()["items"]
            similar = c.get(f"/v1/items/{probe}/similar", params={"k": 50}).json()["items"]
        assert not {i["item_id"] for i in popular} & set(top + sim)
        assert not {i["item_id"] for i in similar} & set(top + sim)
    finally:
        with engine.begin() as conn:
            conn.execute(update(Item).where(Item.external_id.in_(top + sim)).values(hidden=False))
        with server.admin() as a:
            a.post("/admin/reload")
        engine.dispose()


def test_served_lists_are_logged_as_impressions(server: Server) -> None:
    with server.client() as c:
        resp = c.get(
            "/v1/users/u3/recommendations", params={"k": 4}, headers={"X-Request-ID": "imp-" + _uid()}
        )
    body = resp.json()
    assert resp.headers["x-request-id"] == body["request_id"] and body["request_id"].startswith("imp-")
    engine = make_engine(server.dep.url)
    try:
        deadline = time.monotonic() + 10
        rows: list = []
        while time.monotonic() < deadline and not rows:
            with engine.connect() as conn:
                rows = conn.execute(
                    select(Impression.item_ids, Impression.model_version, User.external_id)
                    .join(User, User.id == Impression.user_id)
                    .where(Impression.request_id == body["request_id"])
                ).all()
                names = dict(conn.execute(select(Item.id, Item.external_id)).all())
            time.sleep(0.1)
        assert [(v, u) for _, v, u in rows] == [("v1", "u3")]  # one row per served list, items in rank order
        assert [names[i] for i in decode_item_ids(rows[0].item_ids)] == [i["item_id"] for i in body["items"]]
    finally:
        engine.dispose()


def test_metrics_count_routes_and_fallbacks(server: Server) -> None:
    with server.client() as c:
        c.get(f"/v1/users/{_uid()}/recommendations")
        text = c.get("/metrics").text
    assert 'route="/v1/users/{user_id}/recommendations"' in text
    assert 'recsys_model_info{version="v1"} 1.0' in text
    assert 'recsys_fallbacks_total{source="popular"}' in text
    assert "recsys_events_written_total" in text
    assert "recsys_http_request_duration_seconds_bucket" in text
    assert re.search(r"^recsys_recent_events_view_ready(\{[^}]*\})? 1\.0$", text, re.M)


def test_events_written_by_another_process_are_excluded_soon(server: Server) -> None:
    """Events that did not come through this worker reach its in-memory view by the tail (~0.25 s)."""
    with server.client() as c:
        first = c.get("/v1/users/u4/recommendations", params={"k": 5}).json()["items"][0]["item_id"]
    frame = pd.DataFrame(
        {
            "user_id": ["u4"],
            "item_id": [first],
            "timestamp": [time.time()],
            "type": ["purchase"],
            "value": [None],
            "event_id": [_uid()],
        }
    )
    engine = make_engine(server.dep.url)
    try:
        with engine.begin() as conn:
            assert insert_events(conn, frame) == 1
    finally:
        engine.dispose()
    deadline = time.monotonic() + 5
    with server.client() as c:
        while time.monotonic() < deadline:
            items = {
                i["item_id"] for i in c.get("/v1/users/u4/recommendations", params={"k": 5}).json()["items"]
            }
            if first not in items:
                break
            time.sleep(0.05)
    assert first not in items
