"""Admin pages on the server side (no browser): the login gate, roles, CSRF, 404s, the schema."""

import re

import pytest

from app import auth
from app.models import ApiKey

PAGES = ["/admin", "/admin/adapters", "/admin/adapters/abc", "/admin/jobs", "/admin/jobs/new", "/admin/jobs/abc",
         "/admin/playground"]


@pytest.fixture
def keyed(make_client, tiny_base):
    client = make_client(tiny_base)
    with client.app.state.runtime.sessions() as session:
        _, client.inference_key = auth.create_key(session, "inference", "app")
        _, client.admin_key = auth.create_key(session, "admin", "ops")
    return client


def csrf_of(html: str) -> str:
    return re.search(r'name="csrf_token" value="([^"]+)"', html).group(1)


def log_in(client, key: str, next_: str = "/admin", token: str | None = None):
    form = client.get("/admin/login", follow_redirects=False)
    assert form.status_code == 200, form.status_code
    return client.post("/admin/login", data={"api_key": key, "csrf_token": token or csrf_of(form.text), "next": next_},
                       follow_redirects=False)


def test_revoking_the_admin_key_ends_its_browser_session(keyed):
    assert log_in(keyed, keyed.admin_key).status_code == 303
    overview = keyed.get("/admin", follow_redirects=False)
    assert overview.status_code == 200
    headers = {"X-CSRF-Token": csrf_of(overview.text)}
    assert keyed.delete("/adapters/missing", headers=headers).status_code == 404  # the session may manage
    with keyed.app.state.runtime.sessions() as session:
        session.delete(session.get(ApiKey, keyed.admin_key.split("_")[1]))
        session.commit()
    assert keyed.get("/admin", follow_redirects=False).status_code == 303
    assert keyed.delete("/adapters/missing", headers=headers).status_code == 401


@pytest.mark.parametrize("path", PAGES)
def test_logged_out_browsers_are_sent_to_the_login_form(keyed, path):
    response = keyed.get(path, follow_redirects=False)
    assert response.status_code == 303
    assert response.headers["location"] == "/admin/login?next=" + path.replace("/", "%2F")


def test_login_needs_the_forms_csrf_token_and_an_admin_key(keyed):
    assert log_in(keyed, keyed.admin_key, token="forged").status_code == 403
    refused = log_in(keyed, "ssk_000000000000_wrong")
    assert refused.status_code == 401 and "That key is not valid." in refused.text
    refused = log_in(keyed, keyed.inference_key)
    assert refused.status_code == 403 and "inference key" in refused.text
    assert keyed.get("/admin", follow_redirects=False).status_code == 303

    accepted = log_in(keyed, keyed.admin_key, next_="/admin/jobs?status=failed")
    assert (accepted.status_code, accepted.headers["location"]) == (303, "/admin/jobs?status=failed")
    overview = keyed.get("/admin")
    assert overview.status_code == 200
    assert '<span class="who-key" title="Signed in with this admin key">ops</span>' in overview.text
    assert "open mode" not in overview.text
    assert keyed.get("/admin/login", follow_redirects=False).headers["location"] == "/admin"  # already in

    keyed.post("/admin/logout", data={"csrf_token": "forged"})
    assert keyed.get("/admin", follow_redirects=False).status_code == 200  # a forged logout does nothing
    keyed.post("/admin/logout", data={"csrf_token": csrf_of(overview.text)})
    assert keyed.get("/admin", follow_redirects=False).status_code == 303


@pytest.mark.parametrize("target", ["https://evil.example/", "//evil.example/admin", "/docs"])
def test_login_never_redirects_out_of_the_admin_pages(keyed, target):
    response = log_in(keyed, keyed.admin_key, next_=target)
    assert (response.status_code, response.headers["location"]) == (303, "/admin")


def test_an_inference_key_gets_a_403_page(keyed):
    response = keyed.get("/admin/adapters", headers={"Authorization": f"Bearer {keyed.inference_key}"})
    assert response.status_code == 403 and response.headers["content-type"].startswith("text/html")
    assert "need an admin key" in response.text
    admin = keyed.get("/admin/adapters", headers={"Authorization": f"Bearer {keyed.admin_key}"})
    assert admin.status_code == 200


def test_open_mode_serves_the_pages_and_says_so(make_client, tiny_base):
    client = make_client(tiny_base)
    for path in ["/admin", "/admin/adapters", "/admin/jobs", "/admin/jobs/new", "/admin/playground"]:
        response = client.get(path)
        assert response.status_code == 200 and "open mode" in response.text, path
    assert client.get("/admin/login", follow_redirects=False).headers["location"] == "/admin"


@pytest.mark.parametrize("path, what", [("/admin/adapters/0123456789ab", "Adapter 0123456789ab"),
                                        ("/admin/jobs/0123456789ab", "Training job 0123456789ab")])
def test_unknown_adapter_and_job_pages_are_404_pages(make_client, tiny_base, path, what):
    response = make_client(tiny_base).get(path)
    assert response.status_code == 404 and response.headers["content-type"].startswith("text/html")
    assert f"{what} does not exist" in response.text


@pytest.mark.parametrize("query", ["page=0", "per_page=5000", "status=exploded"])
def test_bad_page_parameters_get_an_html_error(make_client, tiny_base, query):
    response = make_client(tiny_base).get(f"/admin/jobs?{query}")
    assert response.status_code == 422 and "Invalid address" in response.text


def test_admin_pages_stay_out_of_the_api_schema_and_static_files_are_served(make_client, tiny_base):
    client = make_client(tiny_base)
    assert not [path for path in client.app.openapi()["paths"] if path.startswith("/admin")]
    for name, kind in [("admin.css", "text/css"), ("admin.js", "javascript"), ("chart.js", "javascript")]:
        response = client.get(f"/admin/static/{name}")
        assert response.status_code == 200 and kind in response.headers["content-type"], name


def test_the_overview_shows_the_engine_its_caches_and_recent_latency(make_client, tiny_base):
    client = make_client(tiny_base, kv_cache_tokens=2048, prefix_cache_tokens=256)
    for _ in range(2):
        assert client.post("/generate", json={"prompt": "a fine film", "max_new_tokens": 3}).status_code == 200
    page = client.get("/admin").text
    stats = client.get("/health").json()["engine"]
    held = stats["kv_cache"]["used_tokens"]
    assert held > 0 and f"{held} positions held, 0 promised, of 2,048" in page
    assert "1 cached" in page and "of 256 positions" in page  # the base model's prefix
    assert "median" in page and "2 requests, last minute" in page  # queue, first token, engine time
    assert "idle" in page and "0 training work items run on this model" in page


def test_the_overview_names_the_int8_kernels_chosen_at_load(make_client, tiny_base):
    import dataclasses

    kernels = "cpu: oneDNN packed int8, rows split by sign (exact without VNNI)"
    client = make_client(dataclasses.replace(tiny_base, quantization="int8", int8_kernels=kernels))
    with client.app.state.runtime.sessions() as session:
        _, admin_key = auth.create_key(session, "admin", "ops")
    log_in(client, admin_key)
    page = client.get("/admin")
    assert page.status_code == 200 and "<dt>int8 kernels</dt><dd>" + kernels + "</dd>" in page.text
    assert client.get("/health").json()["int8_kernels"] == kernels
