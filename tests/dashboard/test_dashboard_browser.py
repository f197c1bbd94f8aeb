"""The dashboard in a real browser (headless Chromium) against a real `recsys serve`: sign in, overview,
user inspector with its negatives, a model version, promotion and roll-back, sign out. The same tests
write the screenshots in docs/ (dashboard-*.png), so they show the pages as they are."""

from __future__ import annotations

import io
from collections.abc import Iterator
from urllib.parse import quote

import httpx
import pytest
from dashboard_support import ADMIN_TOKEN, DOCS, DashServer
from PIL import Image

pytestmark = pytest.mark.slow
SCREENSHOT_COLOURS = 64  # palette PNGs keep the screenshots in docs/ small


def screenshot(page: object, name: str, *, full_page: bool = False) -> None:
    """A palette PNG of the page in docs/ (Chromium's own PNG is several times larger)."""
    raw = page.screenshot(full_page=full_page)  # type: ignore[attr-defined]
    image = Image.open(io.BytesIO(raw)).convert("RGB").quantize(SCREENSHOT_COLOURS)
    image.save(DOCS / f"dashboard-{name}.png", optimize=True)


@pytest.fixture(scope="module")
def page(browser: object, dash_server: DashServer) -> Iterator[object]:
    """One signed-in tab at laptop width for the module's tests (they run in order, as a visit would)."""
    context = browser.new_context(viewport={"width": 1280, "height": 900}, base_url=dash_server.base)  # type: ignore[attr-defined]
    tab = context.new_page()
    tab.set_default_timeout(15_000)
    tab.dialogs = []  # any alert() would mean a page ran injected script
    tab.on("dialog", lambda d: (tab.dialogs.append(d.message), d.dismiss()))
    try:
        yield tab
    finally:
        context.close()


def test_sign_in_lands_on_the_page_asked_for(page, dash_server: DashServer) -> None:  # noqa: ANN001
    page.goto("/dashboard/models")
    assert "/dashboard/login" in page.url
    screenshot(page, "login")
    page.fill("#token", "not-the-token")
    page.click("form[action='/dashboard/login'] button")
    assert page.locator("[role=alert]").inner_text() == "Wrong token."
    assert "/dashboard/login" in page.url
    page.fill("#token", ADMIN_TOKEN)
    page.click("form[action='/dashboard/login'] button")
    page.wait_for_url("**/dashboard/models")
    cookie = next(c for c in page.context.cookies() if c["name"] == "recsys_dashboard")
    assert cookie["httpOnly"] and cookie["sameSite"] == "Strict" and cookie["path"] == "/dashboard"
    assert cookie["expires"] > 0  # expiring, not a browser-session cookie
    assert ADMIN_TOKEN not in page.url and ADMIN_TOKEN not in cookie["value"]


def test_overview_shows_the_served_model_counts_events_and_traffic(page, dash_server: DashServer) -> None:  # noqa: ANN001
    httpx.get(dash_server.base + "/v1/users/u1/recommendations")  # some API traffic to show
    frame = dash_server.dep.frame
    known = frame[frame["user_id"] == "u7"].iloc[0]  # a user no other test looks at; the log's last time
    event = {"event_id": "overview-1", "user_id": "u7", "item_id": known["item_id"], "type": "view",
             "timestamp": int(frame["timestamp"].max())}
    for _ in range(2):  # the second is a duplicate
        assert httpx.post(dash_server.base + "/v1/events", json=event).status_code in (200, 201)
    page.goto("/dashboard")
    page.goto("/dashboard")  # a second reading, so the request table has a window
    text = page.locator("main").inner_text()
    assert "Served model" in text and "v1" in text
    cards = page.locator(".card .big").all_inner_texts()
    assert cards[:3] == [f"{frame['user_id'].nunique():,}", f"{frame['item_id'].nunique():,}", f"{len(frame) + 1:,}"]
    ingestion = page.locator("#ingestion").inner_text()
    assert "1 (" in ingestion and "1 duplicate ignored" in ingestion and "refused\nnone" in ingestion
    assert page.locator("table >> text=ndcg@10").count() >= 1  # model against most popular
    assert page.locator("svg.chart[aria-label^='Events per hour'] rect.bar").count() > 0
    routes = page.locator("section:has(h2:text('Requests')) tbody th").all_inner_texts()
    assert "GET /v1/users/{user_id}/recommendations" in routes
    runs = page.locator("section:has(h2:text('Recent training runs')) tbody tr")
    assert runs.count() == 3
    screenshot(page, "overview", full_page=True)


def test_search_opens_the_user_with_recommendations_negatives_and_chart(page, dash_server: DashServer) -> None:  # noqa: ANN001
    page.fill("header input[name=q]", "u1")
    page.click("header form.search button")
    page.wait_for_url("**/dashboard/users/u1")
    recs = page.locator("#recommendations tbody tr")
    assert recs.count() == 10
    assert page.locator("#recommendations tbody tr td:nth-child(4) a").count() > 0  # explanations
    history = page.locator("#history tbody tr")
    assert history.count() > 0
    negatives = page.locator("#negatives-table tbody tr")
    assert negatives.count() > 0
    # the model was trained with the default mask: the page says what became of the known positives
    assert "training leaves them out of its loss" in page.locator("#negatives dl.facts").inner_text()
    chart = page.locator("#negatives svg.chart")
    assert chart.locator(".row-label").first.text_content().startswith("positives (")
    assert chart.locator("circle.dot").count() > negatives.count() // 2
    assert page.locator("select#strategy option").all_inner_texts() == [
        "trained mix", "uniform", "popularity", "in-batch", "hard", "mixed", "feedback",
    ]
    screenshot(page, "user")
    page.evaluate("document.getElementById('negatives').scrollIntoView()")
    screenshot(page, "negatives")


def test_switching_the_strategy_redraws_table_and_chart(page) -> None:  # noqa: ANN001
    page.select_option("select#strategy", "hard")  # the script submits the form on change
    page.wait_for_url("**strategy=hard**")
    sources = set(page.locator("#negatives-table tbody td:nth-child(2)").all_inner_texts())
    assert sources == {"hard"}
    labels = page.locator("#negatives svg.chart .row-label").all_text_contents()
    assert [label.split(" (")[0] for label in labels] == ["positives", "hard"]
    page.select_option("select#strategy", "uniform")
    page.wait_for_url("**strategy=uniform**")
    assert set(page.locator("#negatives-table tbody td:nth-child(2)").all_inner_texts()) == {"uniform"}


def test_item_page_shows_attributes_similar_items_and_activity(page) -> None:  # noqa: ANN001
    page.locator("#recommendations tbody a").first.click()
    page.wait_for_url("**/dashboard/items/**")
    assert page.locator("h2:text('Similar items') + .table-wrap tbody tr").count() == 10
    assert page.locator("svg.chart[aria-label^='Events per day']").count() == 1


def test_model_version_page_has_per_epoch_charts(page) -> None:  # noqa: ANN001
    page.goto("/dashboard/models")
    page.click("a:text-is('v1')")
    page.wait_for_url("**/dashboard/models/v1")
    titles = page.locator("svg.chart > title").all_text_contents()
    for wanted in ("Validation NDCG@10", "Training loss", "Informative-negative rate, per source"):
        assert wanted in titles
    assert page.locator("svg.chart polyline").count() >= 4
    assert page.locator("details table tbody tr").count() >= 6
    screenshot(page, "model", full_page=True)
    page.goto("/dashboard/models/v2")  # an older checkpoint's sparse diagnostics still render
    assert "Informative-negative rate, per source" in page.locator("svg.chart > title").all_text_contents()


def test_promote_and_roll_back_through_their_confirmation(page, dash_server: DashServer) -> None:  # noqa: ANN001
    page.goto("/dashboard/models")
    page.click("tr:has(a:text-is('v2')) a:text('Promote…')")
    page.wait_for_url("**/dashboard/models/v2/promote")
    assert "Promote v2?" in page.locator("h1").inner_text()
    with dash_server.admin() as admin:
        assert admin.get("/admin/models").json()["served_version"] == "v1"  # nothing happens before confirming
        page.click("button:text('Promote v2')")
        page.wait_for_url("**/dashboard/models/v2?done=promoted")
        models = admin.get("/admin/models").json()
        assert models["served_version"] == "v2"
        assert {m["version"]: m["status"] for m in models["models"]} == {
            "v0": "candidate", "v1": "candidate", "v2": "promoted",
        }
        page.click("a:text('Roll back to v1…')")
        page.wait_for_url("**/dashboard/rollback")
        page.click("button:text('Roll back to v1')")
        page.wait_for_url("**/dashboard/models/v1?done=rolled-back")
        models = admin.get("/admin/models").json()
    assert models["served_version"] == "v1"
    assert {m["version"]: m["status"] for m in models["models"]} == {
        "v0": "candidate", "v1": "promoted", "v2": "rejected",
    }
    with dash_server.admin() as admin:  # leave v2 a candidate again, as the other tests expect
        assert admin.post("/admin/models/v2/promote").status_code == 200
        assert admin.post("/admin/models/v1/promote").status_code == 200


def test_a_user_id_with_html_is_shown_as_text(page, dash_server: DashServer) -> None:  # noqa: ANN001
    evil = '<img src=x onerror="alert(1)">'
    with dash_server.client() as api:
        sent = api.post("/v1/events", json={"user_id": evil, "item_id": "i1", "type": "view", "event_id": "evil-1"})
        assert sent.status_code in (200, 201, 202), sent.text
    page.goto(f"/dashboard/users/{quote(evil, safe='')}")
    assert page.locator("h1 .id").inner_text() == evil
    assert page.locator("main img").count() == 0 and page.dialogs == []
    assert "not in model" in page.locator("#negatives .notice").inner_text()  # a user the model lacks
    page.fill("header input[name=q]", evil)
    page.click("header form.search button")
    page.wait_for_url("**/dashboard/users/**")
    assert page.locator("h1 .id").inner_text() == evil and page.dialogs == []


def test_pages_fit_a_phone_width(browser, dash_server: DashServer, page) -> None:  # noqa: ANN001
    context = browser.new_context(
        viewport={"width": 390, "height": 844}, base_url=dash_server.base, storage_state=page.context.storage_state()
    )
    try:
        phone = context.new_page()
        for path in ("/dashboard", "/dashboard/models", "/dashboard/models/v1", "/dashboard/users/u1", "/dashboard/items/i1"):
            phone.goto(path)
            # wide tables scroll inside their frame; the page itself never scrolls sideways
            assert phone.evaluate("document.documentElement.scrollWidth") <= 390, path
        phone.goto("/dashboard/users/u1")
        screenshot(phone, "phone")
    finally:
        context.close()


def test_core_tables_and_the_strategy_form_work_without_javascript(browser, dash_server: DashServer, page) -> None:  # noqa: ANN001
    context = browser.new_context(
        java_script_enabled=False, base_url=dash_server.base, storage_state=page.context.storage_state()
    )
    try:
        tab = context.new_page()
        tab.goto("/dashboard/models")
        assert tab.locator("table.models tbody tr").count() == 3
        tab.goto("/dashboard/users/u1")
        assert tab.locator("#recommendations tbody tr").count() == 10
        tab.select_option("select#strategy", "popularity")  # no script to submit it: the Draw button does
        assert "strategy=popularity" not in tab.url
        tab.click("form.strategy button")
        tab.wait_for_url("**strategy=popularity**")
        assert set(tab.locator("#negatives-table tbody td:nth-child(2)").all_inner_texts()) == {"popularity"}
    finally:
        context.close()


def test_sign_out_ends_the_session(page) -> None:  # noqa: ANN001
    page.goto("/dashboard")
    page.click("form.signout button")
    page.wait_for_url("**/dashboard/login?signed_out=true")
    assert "signed out" in page.locator("[role=alert]").inner_text()
    page.goto("/dashboard/models")
    assert "/dashboard/login" in page.url
