"""API keys and roles: every route in the OpenAPI schema × {no key, bad key, inference key, admin key}."""

import logging
import re
import subprocess
import sys
import threading

import pytest
from fastapi.testclient import TestClient

from app import auth
from app.main import create_app
from app.models import ApiKey
from tests.conftest import REPO, make_settings

PUBLIC = {("GET", "/health")}
ADMIN_ONLY = {
    ("POST", "/adapters"),
    ("DELETE", "/adapters/{adapter_id}"),
    ("POST", "/train-jobs"),
    ("POST", "/train-jobs/{job_id}/cancel"),
    ("POST", "/train-jobs/{job_id}/pause"),
    ("POST", "/train-jobs/{job_id}/resume"),
    ("POST", "/v1/files"),
    ("GET", "/v1/files/{file_id}/content"),  # training data
    ("DELETE", "/v1/files/{file_id}"),
    ("POST", "/v1/fine_tuning/jobs"),
    ("POST", "/v1/fine_tuning/jobs/{fine_tuning_job_id}/cancel"),
    ("POST", "/v1/fine_tuning/jobs/{fine_tuning_job_id}/pause"),
    ("POST", "/v1/fine_tuning/jobs/{fine_tuning_job_id}/resume"),
}


def schema_routes(app) -> list[tuple[str, str]]:
    return sorted((method.upper(), path) for path, item in app.openapi()["paths"].items() for method in item)


@pytest.fixture
def keyed_client(make_client, tiny_base):
    client = make_client(tiny_base)
    with client.app.state.runtime.sessions() as session:
        _, inference = auth.create_key(session, "inference", "app")
        _, admin = auth.create_key(session, "admin", "ops")
    client.keys = {"none": None, "bad": "ssk_000000000000_not-a-real-key", "inference": inference, "admin": admin}
    return client


def call(client, method: str, path: str, key: str | None):
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return client.request(method, re.sub(r"\{[^}]+\}", "missing", path), headers=headers)


def expected(method: str, path: str, who: str) -> str:
    if (method, path) in PUBLIC:
        return "allowed"
    if who in ("none", "bad"):
        return "401"
    if who == "inference" and (method, path) in ADMIN_ONLY:
        return "403"
    return "allowed"


def test_the_walk_covers_every_route(make_client, tiny_base):
    routes = set(schema_routes(make_client(tiny_base).app))
    assert PUBLIC | ADMIN_ONLY <= routes
    assert {("POST", "/generate"), ("GET", "/metrics")} <= routes and len(routes) >= 10


@pytest.mark.parametrize("who", ["none", "bad", "inference", "admin"])
def test_every_route_answers_each_kind_of_caller(keyed_client, who):
    for method, path in schema_routes(keyed_client.app):
        response = call(keyed_client, method, path, keyed_client.keys[who])
        want = expected(method, path, who)
        where = f"{method} {path} as {who}: {response.status_code} {response.text[:200]}"
        if want == "allowed":
            assert response.status_code not in (401, 403) and response.status_code < 500, where
        else:
            assert response.status_code == int(want), where
            if want == "401":
                assert response.headers["WWW-Authenticate"] == "Bearer", where


def test_inference_key_generates_and_admin_key_manages(keyed_client):
    inference = {"Authorization": f"Bearer {keyed_client.keys['inference']}"}
    admin = {"Authorization": f"Bearer {keyed_client.keys['admin']}"}
    generated = keyed_client.post("/generate", json={"prompt": "hello", "max_new_tokens": 2}, headers=inference)
    assert generated.status_code == 200 and generated.json()["usage"]["completion_tokens"] >= 1
    refused = keyed_client.post("/train-jobs", headers=inference, files={"file": ("d.jsonl", b'{"input":"a","output":"b"}\n')})
    assert refused.status_code == 403 and "admin key" in refused.json()["detail"]
    accepted = keyed_client.post("/train-jobs", headers=admin, files={"file": ("d.jsonl", b'{"input":"a","output":"b"}\n')})
    assert accepted.status_code == 202, accepted.text


def test_malformed_authorization_header_is_named(keyed_client):
    response = keyed_client.get("/adapters", headers={"Authorization": "Basic abc"})
    assert response.status_code == 401 and "Bearer" in response.json()["detail"]


def test_keys_are_stored_only_as_hashes(make_client, tiny_base):
    client = make_client(tiny_base)
    with client.app.state.runtime.sessions() as session:
        row, key = auth.create_key(session, "admin", "ops")
        stored = session.get(ApiKey, row.id)
        assert key.startswith(f"ssk_{row.id}_") and len(key) > 40
        assert key not in (stored.key_sha256, stored.name, stored.id)
        assert auth.find_key(session, key).id == row.id
        assert auth.find_key(session, key[:-1] + ("A" if key[-1] != "A" else "B")) is None
        assert auth.find_key(session, f"ssk_{row.id}") is None


def test_open_mode_serves_local_clients_and_says_so(make_client, tiny_base, caplog):
    with caplog.at_level(logging.WARNING):
        client = make_client(tiny_base)
    assert "serving OPEN" in caplog.text
    # No keys: anything goes, even a client that sends some key (as the openai client always does).
    assert client.get("/adapters", headers={"Authorization": "Bearer sk-anything"}).status_code == 200
    assert client.delete("/adapters/missing").status_code == 404


def test_open_mode_refuses_to_start_beyond_localhost(tmp_path, sqlite_url, tiny_base):
    app = create_app(make_settings(tmp_path, sqlite_url, host="0.0.0.0"), base=tiny_base)
    with pytest.raises(RuntimeError, match="refusing to serve openly"):
        with TestClient(app):
            pass


def test_with_keys_it_serves_beyond_localhost(tmp_path, sqlite_url, tiny_base):
    app = create_app(make_settings(tmp_path, sqlite_url, host="0.0.0.0"), base=tiny_base)
    from app.db import make_engine, make_session_factory

    with make_session_factory(make_engine(sqlite_url))() as session:
        _, key = auth.create_key(session, "inference", "app")
    with TestClient(app) as client:
        assert client.get("/adapters").status_code == 401
        assert client.get("/adapters", headers={"Authorization": f"Bearer {key}"}).status_code == 200


@pytest.mark.parametrize(
    "headers",
    [{"Origin": "https://evil.example"}, {"Sec-Fetch-Site": "cross-site"}, {"Sec-Fetch-Site": "same-site"}],
)
def test_cross_site_browser_requests_are_refused_in_open_mode(make_client, tiny_base, headers):
    client = make_client(tiny_base)
    response = client.post("/train-jobs", headers=headers, files={"file": ("d.jsonl", b'{"input":"a","output":"b"}\n')})
    assert response.status_code == 403 and "cross-origin" in response.json()["detail"]
    same_origin = {"Origin": "http://localhost", "Sec-Fetch-Site": "same-origin"}
    assert client.delete("/adapters/missing", headers=same_origin).status_code == 404


def test_cli_creates_lists_and_revokes_keys(sqlite_url, tmp_path):
    env = {"DATABASE_URL": sqlite_url, "DATA_DIR": str(tmp_path / "data"), "PATH": "/usr/bin:/bin"}

    def cli(*args):
        done = subprocess.run([sys.executable, "-m", "app.cli", *args], cwd=REPO, env=env, capture_output=True, text=True)
        assert done.returncode == 0, done.stderr
        return done.stdout

    created = cli("create-key", "--role", "admin", "--name", "ops")
    key = created.strip().splitlines()[-1]
    key_id = key.split("_")[1]
    assert key.startswith("ssk_") and f"admin key {key_id} (ops)" in created
    listed = cli("list-keys")
    assert key_id in listed and "admin" in listed and key not in listed
    assert f"revoked key {key_id}" in cli("revoke-key", key_id)
    assert key_id not in cli("list-keys")


@pytest.mark.parametrize(
    "client_address, host",
    [("203.0.113.7", "localhost"), ("127.0.0.1", "rebind.attacker.example:8000"), ("127.0.0.1", "192.168.1.5")],
)
def test_open_mode_serves_only_local_clients_addressing_localhost(make_client, tiny_base, client_address, host):
    client = make_client(tiny_base)
    assert client.get("/adapters", headers={"Host": "127.0.0.1:8000"}).status_code == 200
    remote = TestClient(client.app, base_url=f"http://{host}", client=(client_address, 50000))
    for method, path in (("GET", "/adapters"), ("DELETE", "/adapters/missing"), ("GET", "/v1/models")):
        response = remote.request(method, path, headers={"Sec-Fetch-Site": "same-origin"})
        assert response.status_code == 401, (method, path, response.text)


@pytest.mark.parametrize("database", ["sqlite_url", "postgres_url"])
def test_nodes_sharing_a_database_share_the_session_secret(tmp_path, database, request):
    url = request.getfixturevalue(database)
    nodes = [make_settings(tmp_path / name, url) for name in ("a", "b", "c", "d")]  # each its own DATA_DIR
    made = []
    threads = [threading.Thread(target=lambda s=s: made.append(auth.session_secret(s))) for s in nodes]
    for thread in threads:  # at once: one of them makes it, all get that one
        thread.start()
    for thread in threads:
        thread.join()
    assert len(made) == 4 and len(set(made)) == 1 and len(made[0]) >= 32
    assert not any((s.data_dir / "secret_key").exists() for s in nodes)  # nothing on a node's disk
    assert auth.session_secret(nodes[0].model_copy(update={"secret_key": "x" * 40})) == "x" * 40


def test_an_install_keeps_the_secret_it_kept_under_data_dir(tmp_path, sqlite_url):
    settings = make_settings(tmp_path, sqlite_url)
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    (settings.data_dir / "secret_key").write_text("s" * 64)  # as nodes before 0006 kept it
    assert auth.session_secret(settings) == "s" * 64
    other = make_settings(tmp_path / "other", sqlite_url)
    assert auth.session_secret(other) == "s" * 64  # now in the database, for every node


def test_a_non_ascii_csrf_token_is_refused_not_a_crash(keyed_client):
    keyed_client.get("/admin/login")  # the session gets its token
    response = keyed_client.post("/admin/login", data={"api_key": "x", "csrf_token": "é"})
    assert response.status_code == 403
