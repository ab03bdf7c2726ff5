"""Item 6: a NUL character, which PostgreSQL text cannot hold, in a name, an id or a search never
reaches the database: body and query fields get a 422 naming them, path ids a 404 (no id holds
one). Same answers on SQLite."""

import re

import pytest

from app import auth
from tests.conftest import adapter_file_bytes, random_soft_prompt

NUL = "\x00"
GOOD_JSONL = b'{"input": "a", "output": "b"}\n'


def stored(client) -> tuple[int, int]:
    return client.get("/adapters").json()["total"], client.get("/train-jobs").json()["total"]


def test_adapter_name(db_client, tiny_base):
    config, weights = adapter_file_bytes(random_soft_prompt(tiny_base, 2, seed=0))
    response = db_client.post("/adapters", data={"name": f"bad{NUL}name"},
                              files={"config": ("c.json", config), "weights": ("w.safetensors", weights)})
    assert response.status_code == 422
    error = response.json()["detail"][0]
    assert error["loc"] == ["body", "name"] and "NUL" in error["msg"]
    assert stored(db_client) == (0, 0)


@pytest.mark.parametrize("field, value", [("name", f"job{NUL}"), ("template", f"Q: {{input}}{NUL}\nA:")])
def test_job_fields(db_client, field, value):
    response = db_client.post("/train-jobs", files={"file": ("t.jsonl", GOOD_JSONL)}, data={field: value})
    assert response.status_code == 422
    assert response.json()["detail"][0]["loc"] == ["body", field]
    assert stored(db_client) == (0, 0)


def test_generate_adapter_id(db_client):
    response = db_client.post("/generate", json={"adapter_id": f"ab{NUL}cd", "prompt": "hi"})
    assert response.status_code == 422
    assert response.json()["detail"][0]["loc"] == ["body", "adapter_id"]


def test_completions_model(db_client):
    response = db_client.post("/v1/completions", json={"model": f"ab{NUL}cd", "prompt": "hi"})
    assert response.status_code == 422
    error = response.json()["error"]
    assert error["param"] == "model" and "NUL" in error["message"]


def test_adapter_search(db_client):
    response = db_client.get("/adapters", params={"name": f"a{NUL}"})
    assert response.status_code == 422
    assert response.json()["detail"][0]["loc"] == ["query", "name"]


@pytest.mark.parametrize("path, param", [("/admin/adapters", "q"), ("/admin/playground", "adapter")])
def test_admin_queries(db_client, path, param):
    response = db_client.get(path, params={param: f"a{NUL}"})
    assert response.status_code == 422 and f"Invalid address: {param}:" in response.text


@pytest.mark.parametrize(
    "method, path",
    [
        ("GET", "/adapters/{}"), ("GET", "/adapters/{}/download"), ("DELETE", "/adapters/{}"),
        ("GET", "/train-jobs/{}"), ("GET", "/train-jobs/{}/events"), ("POST", "/train-jobs/{}/cancel"),
        ("GET", "/admin/adapters/{}"), ("GET", "/admin/jobs/{}"),
    ],
)
def test_path_ids_are_not_found(db_client, method, path):
    response = db_client.request(method, path.format("ab%00cd"))
    assert response.status_code == 404


def test_an_api_key_with_a_nul_is_just_invalid(db_client):
    with db_client.app.state.runtime.sessions() as session:
        auth.create_key(session, "admin", "ops")
    form = db_client.get("/admin/login")
    token = re.search(r'name="csrf_token" value="([^"]+)"', form.text).group(1)
    response = db_client.post("/admin/login", data={"api_key": f"ssk_ab{NUL}cd_secret", "csrf_token": token})
    assert response.status_code == 401 and "That key is not valid." in response.text
