"""Issue 21: an engine fault as clients and operators see it. A fault no row explains fails its
rows with a short message carrying the request id (never the exception's text), the engine goes
on, and /metrics counts it; an engine that cannot serve answers 503 on /health with the reason."""

import pytest

from app.engine.engine import FAULTS_BEFORE_UNHEALTHY
from tests.api.test_generate_api import PROMPTS
from tests.conftest import before_each_forward

SECRET = "CUDA error: an illegal memory access at 0x7f3a"  # what must never reach a client


def fail_every_forward(n: int) -> None:
    raise RuntimeError(SECRET)


@pytest.fixture
def client(make_client, tiny_base):
    return make_client(tiny_base)


def test_a_fault_is_a_500_with_the_request_id_and_the_next_request_is_served(client):
    engine = client.app.state.runtime.engine
    forward = engine.core.runner.forward
    before_each_forward(engine, fail_every_forward)
    response = client.post("/generate", json={"prompt": PROMPTS[0], "max_new_tokens": 3},
                           headers={"X-Request-ID": "abc-1"})
    assert response.status_code == 500
    assert response.json() == {"detail": "an internal error in the engine ended this request; the engine recovered, "
                                         "retry it (request id abc-1)"}
    engine.core.runner.forward = forward
    assert client.post("/generate", json={"prompt": PROMPTS[0], "max_new_tokens": 3}).status_code == 200
    assert 'softserve_engine_faults_total 1.0' in client.get("/metrics").text
    assert client.get("/health").json()["engine"]["faults"] == 1


def test_openai_completions_answer_a_fault_in_openais_error_shape(client, tiny_base):
    before_each_forward(client.app.state.runtime.engine, fail_every_forward)
    response = client.post("/v1/completions", json={"model": tiny_base.name, "prompt": PROMPTS[0], "max_tokens": 3},
                           headers={"X-Request-ID": "abc-2"})
    assert response.status_code == 500
    error = response.json()["error"]
    assert error["type"] == "server_error" and error["message"].endswith("(request id abc-2)")
    assert SECRET not in response.text


@pytest.mark.parametrize("path, body", [("/generate", {"prompt": "x"}), ("/v1/completions", {"model": "m", "prompt": "x"})])
def test_a_bug_anywhere_in_a_route_is_a_json_500_with_the_request_id(client, monkeypatch, path, body):
    import app.api.completion_service as service

    def bug(*args, **kwargs):
        raise KeyError(SECRET)

    monkeypatch.setattr(service, "note_adapter", bug)
    response = client.post(path, json=body, headers={"X-Request-ID": "abc-3"})
    assert response.status_code == 500 and SECRET not in response.text
    message = response.json()["error"]["message"] if path.startswith("/v1") else response.json()["detail"]
    assert message == "internal server error (request id abc-3)"


def test_health_is_503_with_the_reason_when_every_step_fails(client):
    engine = client.app.state.runtime.engine
    assert client.get("/health").json()["status"] == "ok"
    before_each_forward(engine, fail_every_forward)
    for _ in range(FAULTS_BEFORE_UNHEALTHY):
        assert client.post("/generate", json={"prompt": PROMPTS[0], "max_new_tokens": 2}).status_code == 500
    health = client.get("/health")
    assert health.status_code == 503
    assert health.json()["status"] == "unavailable"
    assert health.json()["problem"] == f"the engine's last {FAULTS_BEFORE_UNHEALTHY} steps failed"
    assert "softserve_engine_healthy 0.0" in client.get("/metrics").text


def test_health_is_503_and_generation_503_once_the_engine_cannot_rebuild(client):
    engine = client.app.state.runtime.engine
    before_each_forward(engine, fail_every_forward)

    def cannot(*args):
        raise RuntimeError(SECRET)

    engine.core.kv.reset = cannot
    assert client.post("/generate", json={"prompt": PROMPTS[0], "max_new_tokens": 2}).status_code == 503
    refused = client.post("/generate", json={"prompt": PROMPTS[0], "max_new_tokens": 2})
    assert refused.status_code == 503 and SECRET not in refused.text
    assert "this node cannot serve" in refused.json()["detail"]
    health = client.get("/health")
    assert health.status_code == 503 and health.json()["problem"] == "the engine could not rebuild its state after a fault"
