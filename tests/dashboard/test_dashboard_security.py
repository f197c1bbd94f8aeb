"""The dashboard's security model over real HTTP against `recsys serve`: sessions, CSRF, wrong tokens and
their limit, the token kept out of URLs and logs, escaping, and the dashboard off without a token."""

from __future__ import annotations

from collections.abc import Iterator
from http.cookies import SimpleCookie
from urllib.parse import quote

import httpx
import pytest
from dashboard_support import ADMIN_TOKEN, DashServer, form_token

pytestmark = pytest.mark.slow
PAGES = [
    "/dashboard", "/dashboard/models", "/dashboard/models/v1", "/dashboard/models/v1/promote",
    "/dashboard/rollback", "/dashboard/users/u1", "/dashboard/items/i1", "/dashboard/search?q=u1",
]
ACTIONS = ["/dashboard/models/v2/promote", "/dashboard/rollback", "/dashboard/logout"]


def _cookies(response: httpx.Response) -> dict[str, str]:
    """Set-Cookie headers by cookie name (the raw header, attributes included)."""
    return {SimpleCookie(h).popitem()[0]: h for h in response.headers.get_list("set-cookie")}


@pytest.fixture
def signed_in(dash_server: DashServer) -> Iterator[httpx.Client]:
    with dash_server.client() as client:
        assert dash_server.signed_in(client).status_code == 303
        yield client


def test_every_page_and_action_without_a_session_goes_to_sign_in(dash_server: DashServer) -> None:
    with dash_server.client() as client:
        for path in PAGES:
            r = client.get(path)
            assert r.status_code == 303, path
            assert r.headers["location"].startswith("/dashboard/login?next=%2Fdashboard"), path
        for path in ACTIONS:
            r = client.post(path, data={"csrf": "x"})
            assert r.status_code == 303 and r.headers["location"].startswith("/dashboard/login"), path
        assert client.get("/dashboard/login").status_code == 200
        assert client.get("/dashboard/static/dashboard.css").status_code == 200
    forged = "eyJzaWQiOiJ4IiwiZXhwIjo5OTk5OTk5OTk5fQ.AAAA"  # {"sid":"x","exp":9999999999}, unsigned
    with dash_server.client(cookies={"recsys_dashboard": forged}) as client:
        assert client.get("/dashboard").status_code == 303


def test_sign_in_sets_a_strict_http_only_expiring_cookie_and_keeps_the_token_out_of_urls_and_logs(
    dash_server: DashServer,
) -> None:
    with dash_server.client() as client:
        r = dash_server.signed_in(client)
        assert r.status_code == 303 and r.headers["location"] == "/dashboard"
        cookie = _cookies(r)["recsys_dashboard"]
        assert "HttpOnly" in cookie and "SameSite=strict" in cookie and "Path=/dashboard" in cookie
        assert "Max-Age=28800" in cookie and "Secure" not in cookie  # plain HTTP here
        assert ADMIN_TOKEN not in cookie and ADMIN_TOKEN not in r.headers["location"]
        page = client.get("/dashboard")
        assert page.status_code == 200 and "Sign out" in page.text
        assert "frame-ancestors 'none'" in page.headers["content-security-policy"]
        assert page.headers["cache-control"] == "no-store"
        assert ADMIN_TOKEN not in page.text
    logs = dash_server.logs()
    assert '"path":"/dashboard/login"' in logs  # the access log is on, and holds paths only
    assert ADMIN_TOKEN not in logs


def test_over_https_the_cookies_are_secure(dash_server: DashServer) -> None:
    https = {"X-Forwarded-Proto": "https"}  # what a TLS-terminating proxy on this host says
    with dash_server.client() as client:
        form = client.get("/dashboard/login", headers=https)
        nonce = _cookies(form)["recsys_dashboard_login"]
        assert "Secure" in nonce
        r = client.post(
            "/dashboard/login",
            headers={**https, "Cookie": f"recsys_dashboard_login={SimpleCookie(nonce)['recsys_dashboard_login'].value}"},
            data={"token": ADMIN_TOKEN, "csrf": form_token(form.text), "next": "/dashboard"},
        )
        assert r.status_code == 303, r.text
        assert "Secure" in _cookies(r)["recsys_dashboard"]


def test_a_wrong_token_gives_no_session_and_too_many_are_refused_for_a_while(dash_server: DashServer) -> None:
    guesser = {"X-Forwarded-For": "203.0.113.7"}  # one client address (the proxy header is trusted locally)
    with dash_server.client(headers=guesser) as client:
        for _ in range(5):
            form = client.get("/dashboard/login")
            r = client.post("/dashboard/login", data={"token": "guess", "csrf": form_token(form.text)})
            assert r.status_code == 401 and "Wrong token." in r.text
            assert "recsys_dashboard" not in _cookies(r)
        assert client.get("/dashboard").status_code == 303
        form = client.get("/dashboard/login")
        limited = client.post("/dashboard/login", data={"token": ADMIN_TOKEN, "csrf": form_token(form.text)})
        assert limited.status_code == 429 and int(limited.headers["retry-after"]) > 0
        assert "Too many wrong tokens" in limited.text and "recsys_dashboard" not in _cookies(limited)
    with dash_server.client(headers={"X-Forwarded-For": "198.51.100.2"}) as other:
        assert dash_server.signed_in(other).status_code == 303  # another client is not locked out


def test_sign_in_needs_its_form_token(dash_server: DashServer) -> None:
    with dash_server.client() as client:
        client.get("/dashboard/login")
        r = client.post("/dashboard/login", data={"token": ADMIN_TOKEN, "csrf": "forged"})
        assert r.status_code == 403 and "recsys_dashboard" not in _cookies(r)


def test_posts_without_the_csrf_token_or_from_another_site_are_refused(
    dash_server: DashServer, signed_in: httpx.Client
) -> None:
    with dash_server.admin() as admin:
        for path in ACTIONS:
            assert signed_in.post(path).status_code == 403, path
            assert signed_in.post(path, data={"csrf": "wrong"}).status_code == 403, path
        csrf = form_token(signed_in.get("/dashboard/models/v2/promote").text)
        cross = signed_in.post(
            "/dashboard/models/v2/promote", data={"csrf": csrf}, headers={"Origin": "https://evil.example"}
        )
        assert cross.status_code == 403
        assert admin.get("/admin/models").json()["served_version"] == "v1"  # nothing was promoted
        assert signed_in.get("/dashboard").status_code == 200  # and the session still stands


def test_sign_out_revokes_the_session_cookie(dash_server: DashServer, signed_in: httpx.Client) -> None:
    cookie = signed_in.cookies["recsys_dashboard"]
    csrf = form_token(signed_in.get("/dashboard").text)
    out = signed_in.post("/dashboard/logout", data={"csrf": csrf})
    assert out.status_code == 303 and out.headers["location"] == "/dashboard/login?signed_out=true"
    assert "Max-Age=0" in _cookies(out)["recsys_dashboard"]
    with dash_server.client(cookies={"recsys_dashboard": cookie}) as replay:
        assert replay.get("/dashboard").status_code == 303  # the old cookie, replayed, is refused


def test_a_sign_out_on_one_process_ends_the_session_on_every_other(dash_deployment) -> None:  # noqa: ANN001
    """Two `recsys serve` processes on one database (two replicas, or two workers): the cookie one signed in
    opens the other, and after signing out on the first the second refuses it too."""
    first, second = DashServer(dash_deployment, log_level="warning"), DashServer(dash_deployment, log_level="warning")
    try:
        with first.client() as browser:
            assert first.signed_in(browser).status_code == 303
            cookie = browser.cookies["recsys_dashboard"]
            with second.client(cookies={"recsys_dashboard": cookie}) as other:
                assert other.get("/dashboard").status_code == 200
            out = browser.post("/dashboard/logout", data={"csrf": form_token(browser.get("/dashboard").text)})
            assert out.status_code == 303
        with second.client(cookies={"recsys_dashboard": cookie}) as other:
            refused = other.get("/dashboard")
            assert refused.status_code == 303 and refused.headers["location"].startswith("/dashboard/login")
    finally:
        first.stop()
        second.stop()


def test_odd_ids_and_versions_get_a_clear_page(dash_server: DashServer, signed_in: httpx.Client) -> None:
    evil = "<script>alert(1)</script>"
    r = signed_in.get("/dashboard/users/" + quote(evil, safe=""))
    assert r.status_code == 404
    assert evil not in r.text and "&lt;script&gt;alert(1)&lt;/script&gt;" in r.text
    search = signed_in.get("/dashboard/search", params={"q": evil})
    assert search.status_code == 200 and evil not in search.text
    assert signed_in.get("/dashboard/models/no-such-version").status_code == 404
    gone = signed_in.get("/dashboard/models/v0")  # registered by hand, odd metrics, checkpoint deleted
    assert gone.status_code == 200 and "The checkpoint cannot be read" in gone.text
    listing = signed_in.get("/dashboard/models")
    assert listing.status_code == 200 and "not on disk" in listing.text
    assert 'href="/dashboard/models/v0/promote"' not in listing.text
    assert signed_in.get("/dashboard/models/v1/promote?x=1").status_code == 200
    assert signed_in.get("/dashboard/users/u1", params={"strategy": "bogus", "n": 5}).status_code == 200
    bad = signed_in.get("/dashboard/users/u1", params={"n": 0})  # a hand-edited URL gets a page, not JSON
    assert bad.status_code == 422 and bad.headers["content-type"].startswith("text/html")
    assert "Not understood" in bad.text and "n: Input should be greater than or equal to 1" in bad.text
    assert signed_in.get("/v1/users/u1/recommendations", params={"k": 0}).json()["error"]["code"] == (
        "validation_error")  # the API keeps its JSON errors


def test_with_no_admin_token_the_dashboard_is_off(dash_deployment) -> None:  # noqa: ANN001
    server = DashServer(dash_deployment, admin_token=None, log_level="warning")
    try:
        with server.client() as client:
            for path in ["/dashboard", "/dashboard/login", "/dashboard/static/dashboard.css", *PAGES]:
                r = client.get(path)
                assert r.status_code == 404, path
                assert r.json()["error"]["code"] == "admin_disabled"
            assert client.post("/dashboard/login", data={"token": "x"}).status_code == 404
            assert client.get("/admin/models").status_code == 404  # like /admin
    finally:
        server.stop()
