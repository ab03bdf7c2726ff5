"""Admin browser sessions (issue 9, item 16): logout ends the session on the server, the cookie is
`Secure` over HTTPS, and repeated failed logins from one client are refused for a while."""

import httpx
import pytest
from fastapi.testclient import TestClient

from app import auth
from app.models import AdminSession, utcnow
from tests.admin.test_admin_pages import csrf_of, log_in


def keyed_client(make_client, tiny_base, database_url=None, **overrides) -> TestClient:
    client = make_client(tiny_base, database_url, **overrides)
    with client.app.state.runtime.sessions() as session:
        _, client.admin_key = auth.create_key(session, "admin", "ops")
    return client


def same_app(client: TestClient, address: str, base_url: str = "http://localhost", **kwargs) -> TestClient:
    """Another browser on the same running app, from `address`."""
    return TestClient(client.app, base_url=base_url, client=(address, 50000), **kwargs)


@pytest.mark.parametrize("database", ["sqlite", "postgres"])
def test_a_cookie_copied_before_logout_is_refused_after_it(make_client, tiny_base, request, database):
    url = request.getfixturevalue("postgres_url") if database == "postgres" else None
    client = keyed_client(make_client, tiny_base, url)
    assert log_in(client, client.admin_key).status_code == 303
    csrf = csrf_of(client.get("/admin").text)
    copied = client.cookies[auth.SESSION_COOKIE]  # what a thief would copy: session and CSRF token
    replay = same_app(client, "127.0.0.1", cookies={auth.SESSION_COOKIE: copied})
    assert replay.get("/admin", follow_redirects=False).status_code == 200  # the copy works while logged in
    assert replay.delete("/adapters/missing", headers={auth.CSRF_HEADER: csrf}).status_code == 404

    assert client.post("/admin/logout", data={"csrf_token": csrf}, follow_redirects=False).status_code == 303
    assert replay.get("/admin", follow_redirects=False).status_code == 303  # to the login form
    assert replay.delete("/adapters/missing", headers={auth.CSRF_HEADER: csrf}).status_code == 401
    with client.app.state.runtime.sessions() as session:
        assert session.query(AdminSession).count() == 0


def test_an_expired_session_is_refused(make_client, tiny_base):
    client = keyed_client(make_client, tiny_base)
    log_in(client, client.admin_key)
    assert client.get("/admin", follow_redirects=False).status_code == 200
    with client.app.state.runtime.sessions() as session:
        session.query(AdminSession).update({AdminSession.expires_at: utcnow()})
        session.commit()
    assert client.get("/admin", follow_redirects=False).status_code == 303


def session_cookie_header(response) -> str:
    (cookie,) = [value for value in response.headers.get_list("set-cookie") if value.startswith(auth.SESSION_COOKIE)]
    return cookie.lower()


def test_the_session_cookie_is_secure_over_https_only(make_client, tiny_base):
    client = keyed_client(make_client, tiny_base)
    over_https = same_app(client, "198.51.100.4", base_url="https://softserve.example")
    form = over_https.get("/admin/login")
    assert "; secure" in session_cookie_header(form)
    login = over_https.post("/admin/login", data={"api_key": client.admin_key, "csrf_token": csrf_of(form.text)},
                            follow_redirects=False)
    assert login.status_code == 303 and "; secure" in session_cookie_header(login)
    assert "; secure" not in session_cookie_header(client.get("/admin/login"))  # plain http (a local `make run`)


def test_repeated_failed_logins_from_one_client_get_429(make_client, tiny_base):
    client = keyed_client(make_client, tiny_base, login_max_failures=3, login_failure_window_s=60)
    for _ in range(3):
        assert log_in(client, "ssk_000000000000_guess").status_code == 401
    refused = log_in(client, client.admin_key)  # even the right key, until the window has passed
    assert refused.status_code == 429 and 0 < int(refused.headers["Retry-After"]) <= 60
    assert "Too many failed logins" in refused.text

    other = same_app(client, "198.51.100.7")  # another client is not held back
    assert log_in(other, client.admin_key).status_code == 303
    assert other.get("/admin", follow_redirects=False).status_code == 200

    throttle = client.app.state.login_throttle
    now = throttle.clock()
    throttle.clock = lambda: now + 61
    assert log_in(client, client.admin_key).status_code == 303


def test_behind_a_tls_proxy_on_this_machine_cookies_are_secure_and_clients_throttled_apart(make_live_server, tiny_base):
    """uvicorn, as `make run` starts it, trusts X-Forwarded-Proto/-For from 127.0.0.1 (FORWARDED_ALLOW_IPS)."""
    server = make_live_server(tiny_base, login_max_failures=2)
    with server.runtime.sessions() as session:
        _, admin_key = auth.create_key(session, "admin", "ops")

    def log_in_through_proxy(address: str, key: str) -> tuple[httpx.Response, httpx.Response]:
        with httpx.Client(base_url=server.url, headers={"X-Forwarded-Proto": "https", "X-Forwarded-For": address}) as browser:
            form = browser.get("/admin/login")
            # httpx keeps a Secure cookie for https URLs only; the proxy would carry it, so send it by hand.
            browser.cookies.set(auth.SESSION_COOKIE, form.cookies[auth.SESSION_COOKIE])
            return form, browser.post("/admin/login", data={"api_key": key, "csrf_token": csrf_of(form.text)})

    assert [log_in_through_proxy("203.0.113.5", "ssk_0_guess")[1].status_code for _ in range(3)] == [401, 401, 429]
    form, login = log_in_through_proxy("203.0.113.6", admin_key)
    assert "; secure" in session_cookie_header(form)
    assert login.status_code == 303 and "; secure" in session_cookie_header(login)


def test_a_peer_that_makes_up_forwarded_addresses_still_meets_its_own_ceiling(make_live_server, tiny_base):
    """Issue 21, finding 10: a client on this machine (a trusted proxy address) rotating
    X-Forwarded-For was never limited."""
    server = make_live_server(tiny_base, login_max_failures=2, login_max_failures_per_peer=4)
    with server.runtime.sessions() as session:
        _, admin_key = auth.create_key(session, "admin", "ops")

    def log_in_as(address: str, key: str) -> int:
        with httpx.Client(base_url=server.url, headers={"X-Forwarded-For": address}) as browser:
            form = browser.get("/admin/login")
            return browser.post("/admin/login", data={"api_key": key, "csrf_token": csrf_of(form.text)}).status_code

    assert [log_in_as(f"198.51.100.{i}", "ssk_0_guess") for i in range(5)] == [401, 401, 401, 401, 429]
    assert log_in_as("198.51.100.99", admin_key) == 429  # the peer waits out its window, whoever it forwards
