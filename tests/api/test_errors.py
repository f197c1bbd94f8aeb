"""Every kind of bad input answers the right 4xx with the one error shape, never a 500."""

from __future__ import annotations

import pytest
from api_support import Server, assert_error

GOOD = {"event_id": "err-ok", "user_id": "u1", "item_id": "i1", "type": "click"}


@pytest.mark.parametrize(
    ("path", "status", "code"),
    [
        ("/v1/users/u1/recommendations?k=0", 422, "validation_error"),
        ("/v1/users/u1/recommendations?k=1001", 422, "validation_error"),
        ("/v1/users/u1/recommendations?k=abc", 422, "validation_error"),
        ("/v1/users/u1/recommendations?exclude_seen=maybe", 422, "validation_error"),
        ("/v1/users/" + "x" * 257 + "/recommendations", 422, "validation_error"),
        ("/v1/users/bad%00id/recommendations", 422, "validation_error"),
        ("/v1/items/no-such-item/similar", 404, "unknown_item"),
        ("/v1/items/i1/similar?k=-3", 422, "validation_error"),
        ("/v1/nothing-here", 404, "not_found"),
    ],
)
def test_bad_queries(server: Server, path: str, status: int, code: str) -> None:
    with server.client() as c:
        assert_error(c.get(path), status, code)


def test_wrong_method(server: Server) -> None:
    with server.client() as c:
        assert_error(c.delete("/v1/events"), 405, "method_not_allowed")


@pytest.mark.parametrize(
    "body",
    [
        {**GOOD, "event_id": ""},
        {**GOOD, "event_id": "e" * 129},
        {**GOOD, "user_id": "u" * 257},
        {**GOOD, "item_id": ""},
        {**GOOD, "item_id": "a\nb"},
        {**GOOD, "user_id": "u\x00"},
        {**GOOD, "event_id": "e\x7f"},
        {**GOOD, "event_id": "\x1f"},
        {**GOOD, "type": "Not A Type"},
        {**GOOD, "type": "t" * 33},
        {**GOOD, "value": "high"},
        {**GOOD, "timestamp": -1},
        {**GOOD, "timestamp": 1e12},
        {**GOOD, "timestamp": "yesterday"},
        {**GOOD, "timestamp": "1969-12-31T23:59:59Z"},
        {**GOOD, "timestamp": "2026-13-01T00:00:00Z"},
        {**GOOD, "user_id": 17},
        {**GOOD, "surprise": 1},
        {k: v for k, v in GOOD.items() if k != "event_id"},
        [GOOD, {**GOOD, "type": None}],
        "just a string",
        42,
    ],
)
def test_invalid_events_are_rejected_whole(server: Server, body: object) -> None:
    with server.client() as c:
        body_out = assert_error(c.post("/v1/events", json=body), 422, "validation_error")
        assert body_out["error"]["details"]


def test_a_bad_timestamp_is_named_with_both_accepted_forms(server: Server) -> None:
    with server.client() as c:
        body = assert_error(c.post("/v1/events", json={**GOOD, "timestamp": "07/12/2026"}), 422, "validation_error")
    (detail,) = body["error"]["details"]
    assert detail["loc"] == ["body", "timestamp"]
    assert "epoch seconds" in detail["msg"] and "ISO 8601" in detail["msg"]


@pytest.mark.parametrize(
    "raw",
    [b'{"event_id": "x", ', b"NaN", b'{"event_id": "n", "value": NaN}', b"\xff\xfe",
     b'{"event_id": "s\\ud800", "user_id": "u1", "item_id": "i1", "type": "click"}'],  # a lone surrogate
)
def test_malformed_or_non_finite_json(server: Server, raw: bytes) -> None:
    with server.client() as c:
        resp = c.post("/v1/events", content=raw, headers={"content-type": "application/json"})
    body = assert_error(resp, 422)
    assert body["error"]["code"] in {"malformed_json", "validation_error"}


def test_ids_in_any_script_are_accepted(server: Server) -> None:
    event = {"event_id": "évé-字-1", "user_id": "usér 夏", "item_id": "ïtem\u00a0x", "type": "click"}
    with server.client() as c:
        resp = c.post("/v1/events", json=event)
        assert resp.status_code == 200, resp.text
        assert resp.json() == {"received": 1, "accepted": 1, "duplicates": 0}


def test_oversized_batch_is_413(server: Server) -> None:
    batch = [{**GOOD, "event_id": f"big-{i}"} for i in range(1001)]
    with server.client() as c:
        assert_error(c.post("/v1/events", json=batch), 413, "batch_too_large")
        # Nothing of the refused batch was stored: the first 1000 go in fresh.
        assert c.post("/v1/events", json=batch[:1000]).json()["accepted"] == 1000


def _spaces(total: int, size: int = 2**20):  # noqa: ANN202 - a generator: httpx sends it chunked
    for start in range(0, total, size):
        yield b" " * min(size, total - start)


def test_a_body_over_the_limit_is_413_before_it_is_read(server: Server) -> None:
    """RECSYS_MAX_BODY_BYTES (8 MiB by default): a declared length over it is refused before the body is
    read, a chunked body as soon as it passes it; the one error shape and the request id either way."""
    limit, json_type = 8 * 2**20, {"content-type": "application/json"}
    with server.client() as c:
        declared = c.post("/v1/events", content=b" " * (limit + 1), headers=json_type)
        assert_error(declared, 413, "payload_too_large")
        assert declared.headers["x-request-id"]
        assert_error(c.post("/v1/events", content=_spaces(limit + 2**20), headers=json_type), 413, "payload_too_large")
        # a body FastAPI parses into a model (not read by the handler itself): the same 413, not a 400
        assert_error(c.put("/v1/items/i1", content=_spaces(limit + 2**20), headers=json_type), 413, "payload_too_large")
        # at the limit the body is read, and refused for what it holds
        assert_error(c.post("/v1/events", content=b" " * limit, headers=json_type), 422, "malformed_json")


@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"Authorization": "Bearer wrong"},
        {"Authorization": "Basic dGVzdDp0ZXN0"},
        {"Authorization": "Bearer"},
    ],
)
def test_admin_needs_the_token(server: Server, headers: dict[str, str]) -> None:
    with server.client(headers=headers) as c:
        for method, path in [
            ("GET", "/admin/models"),
            ("POST", "/admin/reload"),
            ("POST", "/admin/models/v1/promote"),
            ("GET", "/admin/users/u1/negatives"),
        ]:
            assert_error(c.request(method, path), 401, "unauthorized")


def test_admin_unknown_things(server: Server) -> None:
    with server.admin() as a:
        assert_error(a.post("/admin/models/no-such-version/promote"), 404, "unknown_version")
        assert_error(a.post("/admin/models/bad version!/promote"), 422, "validation_error")
        assert_error(a.get("/admin/users/u1/negatives", params={"n": 0}), 422, "validation_error")
