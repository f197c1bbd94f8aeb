"""The dashboard's parts on their own: sessions and the wrong-token limit, charts, diagnostics of old and
new checkpoints, latency percentiles from histogram buckets, and its queries on SQLite and PostgreSQL."""

from __future__ import annotations

import re
import time
import tomllib
from pathlib import Path

import pandas as pd
import pytest

from app.dashboard import auth, charts, diagnostics, queries
from app.dashboard.traffic import Traffic, quantile
from app.dashboard.web import safe_next
from app.db import registry
from app.db.engine import make_engine
from app.db.events import insert_events
from app.db.migrate import upgrade

TOKEN = "s3cret"


def test_a_session_cookie_is_refused_when_forged_expired_revoked_or_signed_with_another_token() -> None:
    revoked = auth.Revoked()
    session, cookie = auth.new_session(TOKEN, now=1000.0)
    assert auth.read_session(cookie, TOKEN, revoked, now=1001.0) == session
    assert auth.read_session(cookie, TOKEN, revoked, now=1000.0 + auth.SESSION_SECONDS) is None  # expired
    assert auth.read_session(cookie, "another-token", revoked, now=1001.0) is None  # token rotated
    payload, sig = cookie.split(".")
    assert auth.read_session(payload + "." + sig[:-2] + "AA", TOKEN, revoked, now=1001.0) is None
    assert auth.read_session("garbage", TOKEN, revoked) is None and auth.read_session(None, TOKEN, revoked) is None
    _, live = auth.new_session(TOKEN)
    revoked.add(auth.read_session(live, TOKEN, revoked))
    assert auth.read_session(live, TOKEN, revoked) is None


def test_a_revocation_in_the_database_is_seen_by_every_worker(tmp_path) -> None:  # noqa: ANN001
    from app.db.engine import make_engine
    from app.db.migrate import upgrade

    url = f"sqlite:///{tmp_path / 'recsys.db'}"
    upgrade(url)
    engine = make_engine(url)
    one, two = auth.Revoked(lambda: engine), auth.Revoked(lambda: engine)
    session, cookie = auth.new_session(TOKEN)
    assert auth.read_session(cookie, TOKEN, two) == session
    one.add(session)
    one.add(session)  # twice (two workers at once) is still one revocation
    assert auth.read_session(cookie, TOKEN, two) is None
    old, _ = auth.new_session(TOKEN, now=1000.0)  # long expired: the next sign-out deletes its row
    one.add(old)
    one.add(auth.new_session(TOKEN)[0])
    with engine.connect() as conn:
        assert conn.exec_driver_sql("SELECT count(*) FROM dashboard_revocations").scalar() == 2
    engine.dispose()


def test_form_tokens_are_bound_to_their_session() -> None:
    token = auth.csrf_token(TOKEN, "sid-1")
    assert auth.csrf_ok(token, TOKEN, "sid-1")
    assert not auth.csrf_ok(token, TOKEN, "sid-2") and not auth.csrf_ok(None, TOKEN, "sid-1")
    assert not auth.csrf_ok(token, "another-token", "sid-1")
    assert auth.token_matches(TOKEN, TOKEN) and not auth.token_matches(TOKEN[:-1], TOKEN)


def test_wrong_tokens_are_limited_per_client_and_in_all_for_the_window() -> None:
    limiter = auth.LoginLimiter(per_client=3, overall=5, window=60.0)
    for _ in range(3):
        assert limiter.retry_after("a", now=0.0) == 0
        limiter.failed("a", now=0.0)
    assert 59 <= limiter.retry_after("a", now=1.0) <= 61
    assert limiter.retry_after("b", now=1.0) == 0
    limiter.failed("b", now=1.0)
    limiter.failed("c", now=1.0)
    assert limiter.retry_after("d", now=2.0) > 0  # five in all within the window: everyone waits
    assert limiter.retry_after("a", now=60.5) == 0 and limiter.retry_after("d", now=60.5) == 0  # it passed
    limiter.failed("b", now=61.0)
    limiter.succeeded("b")  # a right token clears the client's count
    assert limiter.retry_after("b", now=61.0) == 0


def test_only_dashboard_paths_are_followed_after_sign_in() -> None:
    assert safe_next("/dashboard/users/u1?strategy=hard") == "/dashboard/users/u1?strategy=hard"
    for target in ("https://evil.example/dashboard", "//evil.example/dashboard", "/admin/models", "/dashboardx",
                   "/\\evil.example", None, ""):
        assert safe_next(target) == "/dashboard", target


def test_charts_escape_their_labels_and_say_when_there_is_nothing_to_draw() -> None:
    evil = "<script>alert(1)</script>"
    svg = charts.distribution_chart(evil, [(evil, [0.1, 0.5, 0.9]), ("hard", [0.2, 0.4])], marker=(0.0, evil))
    assert "<script>" not in svg and "&lt;script&gt;" in svg and svg.count("<circle") == 5
    assert "no data recorded" in charts.line_chart("t", [charts.Series("a", [(1, None)])])
    assert "nothing recorded" in charts.bar_chart("t", [("h", 0.0)])
    line = charts.line_chart("t", [charts.Series("a", [(1, 0.1), (2, None), (3, 0.3), (4, 0.2)])])
    assert line.count("<polyline") == 1  # the gap splits the line; a lone point stays a dot
    assert charts.nice_ticks(0.0, 0.87) == [0.0, 0.2, 0.4, 0.6, 0.8, 1.0]
    assert charts.nice_ticks(3.0, 3.0)[0] <= 3.0 <= charts.nice_ticks(3.0, 3.0)[-1]


def test_diagnostics_of_new_and_old_checkpoints() -> None:
    new = [
        {"epoch": e, "phase": "selection", "loss": 7.0 - e, "val_ndcg@10": 0.1 * e, "informative_rate": 0.5,
         "false_negative_rate": 0.01, "index_refresh_s": 0.2, "hard_search_s": 0.1,
         "sources": {"hard": {"negatives": 10, "informative_rate": 0.9, "false_negative_rate": 0.05},
                     "uniform": {"negatives": 20, "informative_rate": 0.1}}}
        for e in (1, 2, 3)
    ] + [{"epoch": 1, "phase": "all", "loss": 4.0}]
    titles = [str(c).split("<title>")[1].split("</title>")[0] for c in diagnostics.charts(new)]
    assert titles[:4] == ["Validation NDCG@10", "Training loss", "Informative-negative rate, per source",
                          "False-negative rate, per source"]
    assert "Hard-negative index refresh and search (s)" in titles
    fnr = next(c for c in diagnostics.charts(new) if "False-negative" in str(c))
    assert ">hard</text>" in fnr and ">uniform</text>" not in fnr  # a source without the rate has no line
    # the final fit recorded no rate, yet the chart keeps the run's whole axis: every drawn x inside the chart
    xs = [float(v) for v in re.findall(r'\bx="([-0-9.]+)"', str(fnr))]
    assert xs and all(0 <= x <= charts.W for x in xs) and "final fit" in fnr
    columns, rows = diagnostics.table(new)
    assert "val_ndcg@10" in columns and rows[-1]["phase"] == "final fit" and rows[-1]["val_ndcg@10"] is None
    source_columns, sources = diagnostics.source_table(new)
    assert len(sources) == 6 and "false_negative_rate" in source_columns
    old = [{"epoch": 1, "informative_rate": 0.4}, "not a dict", {"epoch": 2, "sources": "garbage"}]
    assert len(diagnostics.charts(old)) == 1
    assert diagnostics.charts([]) == [] and diagnostics.table([]) == ([], [])


def test_latency_percentiles_interpolate_inside_buckets() -> None:
    buckets = {0.001: 0.0, 0.01: 50.0, 0.1: 100.0, float("inf"): 100.0}
    assert quantile(0.5, buckets) == pytest.approx(0.01)
    assert quantile(0.75, buckets) == pytest.approx(0.055)
    assert quantile(0.99, {0.01: 0.0, float("inf"): 10.0}) == 0.01  # beyond the last finite bound
    assert quantile(0.5, {0.01: 0.0, float("inf"): 0.0}) is None


def test_queries_and_the_rollback_plan_on_each_backend(db_url: str) -> None:
    upgrade(db_url)
    now = time.time()
    hour = int(now) // 3600 * 3600
    frame = pd.DataFrame({
        "user_id": ["u1", "u1", "u2", "u_x", "u%"],
        "item_id": ["i1", "i2", "i1", "i1", "i3"],
        "timestamp": [hour + 10.0, hour + 20.0, hour - 3600 + 5.0, hour - 86400 * 3.0, hour + 30.0],
        "type": "view",
        "value": None,
    })
    frame["event_id"] = [f"e{i}" for i in range(len(frame))]
    engine = make_engine(db_url)
    try:
        with engine.begin() as conn:
            insert_events(conn, frame)
            registry.register(conn, "a", "/nowhere/a", status="promoted")
            registry.register(conn, "b", "/nowhere/b")
        with engine.connect() as conn:
            assert queries.counts(conn) == {"users": 4, "items": 3, "events": 5}
            hours = queries.events_per_hour(conn, hours=48, now=now)
            assert len(hours) == 48 and hours[-1] == (hour, 3) and hours[-2] == (hour - 3600, 1)
            total, history = queries.user_history(conn, "u1", limit=1)
            assert total == 2 and [e["item_id"] for e in history] == ["i2"]
            assert queries.find_ids(conn, "u_")[0] == ["u_x"]  # LIKE wildcards are literal
            assert queries.find_ids(conn, "u%")[0] == ["u%"]
            activity = queries.item_activity(conn, "i1", days=7, now=now)
            assert activity["events"] == 3 and activity["users"] == 3
            assert sum(n for _, n in activity["per_day"]) == 3
            old = queries.events_per_hour(conn, hours=24, now=now + 86400 * 365)  # a log from the past
            assert old[-1] == (hour, 3)
            with pytest.raises(ValueError, match="only version ever promoted"):
                registry.rollback_plan(conn)
        with engine.begin() as conn:
            registry.promote(conn, "b")
            assert registry.rollback_plan(conn) == ("b", "a")
            registry.reject(conn, "b")
            assert registry.get_version(conn, "b")["status"] == "rejected"
    finally:
        engine.dispose()


def test_every_template_and_asset_is_shipped_in_the_wheel() -> None:
    root = Path(__file__).resolve().parents[2]
    globs = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["app.dashboard"]
    package = root / "app" / "dashboard"
    shipped = {p for g in globs for p in package.glob(g)}
    files = {p for sub in ("templates", "static") for p in (package / sub).rglob("*") if p.is_file()}
    assert files and files <= shipped, sorted(str(p) for p in files - shipped)


def test_ingestion_figures_are_the_group_commits_between_two_readings() -> None:
    from app.api import metrics

    traffic = Traffic(started=0.0)
    traffic.summary(now=1000.0)
    metrics.EVENTS_WRITTEN.inc(30)
    metrics.EVENTS_DUPLICATE.inc(2)
    for size, seconds in ((10, 0.002), (22, 0.004)):
        metrics.EVENTS_PER_COMMIT.observe(size)
        metrics.EVENTS_COMMIT_SECONDS.observe(seconds)
    metrics.EVENTS_REFUSED.labels("events_queue_full").inc(3)
    g = traffic.summary(now=1010.0)["ingest"]
    assert (g["written"], g["per_second"], g["duplicates"]) == (30, 3.0, 2)
    assert (g["commits"], g["events_per_commit"]) == (2, 16.0)
    assert g["commit_p50"] == pytest.approx(2.5) and g["commit_p99"] == pytest.approx(4.95)  # in the buckets
    assert g["refused"] == {"events_queue_full": 3}
