"""Item and user attributes, popular and latest items, on real servers (SQLite and PostgreSQL)."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pandas as pd
import pytest
from api_support import Deployment, Server, assert_error

from app.db.engine import make_engine
from app.db.events import insert_events
from app.db.migrate import upgrade


def _uid(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


def test_attributes_round_trip(server: Server) -> None:
    item, user = _uid("item"), _uid("user")
    attrs = {
        "title": "Été — 夏",
        "categories": ["a", "b"],
        "price": 12.5,
        "n": 2**62,
        "nested": {"x": [1, None]},
    }
    with server.client() as c:
        assert_error(c.get(f"/v1/items/{item}"), 404, "unknown_item")
        assert_error(c.get(f"/v1/users/{user}"), 404, "unknown_user")
        put = c.put(f"/v1/items/{item}", json={"attributes": attrs})
        assert put.status_code == 200, put.text
        got = c.get(f"/v1/items/{item}").json()
        assert got["item_id"] == item and got["attributes"] == attrs and got["hidden"] is False
        assert got["created_at"]
        assert c.put(f"/v1/items/{item}", json={"hidden": True}).json()["attributes"] == attrs  # kept
        replaced = c.put(f"/v1/items/{item}", json={"attributes": {"title": "new"}, "hidden": False}).json()
        assert replaced["attributes"] == {"title": "new"} and replaced["hidden"] is False
        assert c.put(f"/v1/users/{user}", json={"attributes": {"country": "FR"}}).status_code == 200
        assert c.get(f"/v1/users/{user}").json()["attributes"] == {"country": "FR"}
        # Users and items created by events have empty attributes.
        assert c.get("/v1/users/u1").json()["attributes"] == {}
        assert c.get("/v1/items/i1").json() == {
            **c.get("/v1/items/i1").json(),
            "attributes": {},
            "hidden": False,
        }


def test_bad_attributes_get_the_error_shape(server: Server) -> None:
    item = _uid("item")
    big = {"blob": "x" * (16 * 1024)}
    with server.client() as c:
        body = assert_error(c.put(f"/v1/items/{item}", json={"attributes": big}), 413, "attributes_too_large")
        assert body["error"]["details"]["limit"] == 16384
        assert_error(c.put(f"/v1/users/{item}", json={"attributes": big}), 413, "attributes_too_large")
        assert_error(c.get(f"/v1/items/{item}"), 404)  # nothing stored
        just_fits = {"b": "x" * (16 * 1024 - 10)}  # {"b": "…"} is 9 bytes of JSON around the string
        assert c.put(f"/v1/items/{item}", json={"attributes": just_fits}).status_code == 200
        headers = {"Content-Type": "application/json"}
        for raw in (
            b'{"attributes": {"x": NaN}}',
            b'{"attributes": {"x": 123456789012345678901234567890}}',
            b'{"attributes": [1, 2]}',
            b'{"attributes": {}, "extra": 1}',
            b'{"hidden": "maybe"}',
            b'{"attributes": {"x": "\\ud800"}}',
            b"not json",
        ):
            assert_error(c.put(f"/v1/items/{item}", content=raw, headers=headers), 422)
        deep: dict = {}
        node = deep
        for _ in range(40):
            node["a"] = {}
            node = node["a"]
        assert_error(c.put(f"/v1/users/{item}", json={"attributes": deep}), 422, "validation_error")


@pytest.fixture
def catalogue_server(fresh_url: str, tmp_path: Path) -> Iterator[Server]:
    """A server without any model over a small known log: popular and latest need no model."""
    upgrade(fresh_url)
    now = time.time()
    rows = []

    def add(item: str, n: int, age: float, kind: str = "click") -> None:
        for _ in range(n):
            rows.append((_uid("u"), item, now - age, kind, None, _uid("e")))

    add("hot", 3, 60)
    add("warm", 2, 120)
    add("mild", 1, 600)
    add("mild", 5, 600, "dislike")  # negative feedback does not count
    add("old", 4, 3 * 86400)  # outside 24h, inside 7d
    add("ancient", 9, 30 * 86400)  # outside 7d
    add("secret", 10, 60)  # hidden below
    frame = pd.DataFrame(rows, columns=["user_id", "item_id", "timestamp", "type", "value", "event_id"])
    engine = make_engine(fresh_url)
    try:
        with engine.begin() as conn:
            insert_events(conn, frame)
    finally:
        engine.dispose()
    srv = Server(Deployment(fresh_url, tmp_path, frame))
    try:
        srv.wait_ready(path="/healthz")
        yield srv
    finally:
        srv.stop()


def _listed(body: dict) -> list:
    return [i["item_id"] for i in body["items"]]


def test_popular_and_latest_on_a_known_log(catalogue_server: Server) -> None:
    with catalogue_server.client() as c:
        assert c.put("/v1/items/secret", json={"hidden": True}).status_code == 200
        day = c.get("/v1/items/popular", params={"window": "24h", "k": 10}).json()
        assert [(i["item_id"], i["count"]) for i in day["items"]] == [("hot", 3), ("warm", 2), ("mild", 1)]
        assert day["window_seconds"] == 86400 and [i["rank"] for i in day["items"]] == [1, 2, 3]
        assert _listed(c.get("/v1/items/popular", params={"window": "86400"}).json()) == [
            "hot",
            "warm",
            "mild",
        ]
        week = c.get("/v1/items/popular", params={"window": "7d", "k": 2}).json()
        assert [(i["item_id"], i["count"]) for i in week["items"]] == [("old", 4), ("hot", 3)]
        assert _listed(c.get("/v1/items/popular", params={"window": "5m"}).json()) == ["hot", "warm"]
        assert _listed(c.get("/v1/items/popular").json()) == ["old", "hot", "warm", "mild"]  # default 7d
        for bad in ("7x", "0", "-1d", "", "1.5h", "99999999d", "7 d"):
            assert_error(c.get("/v1/items/popular", params={"window": bad}), 422)
        assert_error(c.get("/v1/items/popular", params={"window": "99999d"}), 422, "bad_window")
        assert_error(c.get("/v1/items/popular", params={"k": 0}), 422, "validation_error")
        # Latest: items created one PUT after the other, newest first; hidden ones skipped.
        for name in ("n1", "n2", "n3"):
            assert c.put(f"/v1/items/{name}", json={"attributes": {"t": name}}).status_code == 200
        assert _listed(c.get("/v1/items/latest", params={"k": 3}).json()) == ["n3", "n2", "n1"]
        c.put("/v1/items/n2", json={"hidden": True})
        c.put("/v1/items/hot", json={"hidden": True})
        assert _listed(c.get("/v1/items/latest", params={"k": 3}).json())[:2] == ["n3", "n1"]
        assert "secret" not in _listed(c.get("/v1/items/latest", params={"k": 100}).json())
        assert _listed(c.get("/v1/items/popular", params={"window": "24h"}).json()) == ["warm", "mild"]
        # Recommendations still need a model: the error shape, not a crash.
        assert_error(c.get("/v1/users/x/recommendations"), 503, "no_model")
