"""POST /generate through the real app: adapters, batching, errors."""

from concurrent.futures import ThreadPoolExecutor

import pytest

from app.engine.generation import generate_batch
from app.engine.reference import reference_greedy_decode
from app.engine.requests import GenerationRequest
from app.models import Adapter
from tests.conftest import random_soft_prompt, upload_adapter

PROMPTS = ["a gripping , funny film", "the plot is a mess", "Hello", "it 's a charming journey", "bland and far too long"]


@pytest.fixture
def client(make_client, tiny_base):
    return make_client(tiny_base)


def expected_text(base, prompt_tensor, prompt, n):
    ids = base.tokenizer(prompt).input_ids
    return base.tokenizer.decode(reference_greedy_decode(base, prompt_tensor, ids, n), skip_special_tokens=True)


def test_generate_with_adapter_matches_reference(client, tiny_base):
    prompt = random_soft_prompt(tiny_base, 7, seed=11)
    adapter_id = upload_adapter(client, prompt)["id"]
    response = client.post("/generate", json={"adapter_id": adapter_id, "prompt": PROMPTS[0], "max_new_tokens": 10})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["text"] == expected_text(tiny_base, prompt, PROMPTS[0], 10)
    assert body["adapter_id"] == adapter_id and body["finish_reason"] == "length"
    assert body["usage"] == {"prompt_tokens": len(tiny_base.tokenizer(PROMPTS[0]).input_ids), "completion_tokens": 10}
    assert float(response.headers["X-Queue-Time"]) >= 0 and float(response.headers["X-Inference-Time"]) > 0


def test_generate_without_adapter_uses_the_base_model(client, tiny_base):
    response = client.post("/generate", json={"adapter_id": None, "prompt": PROMPTS[1], "max_new_tokens": 6})
    assert response.json()["text"] == expected_text(tiny_base, None, PROMPTS[1], 6)


def post_concurrently(client, bodies):
    with ThreadPoolExecutor(len(bodies)) as pool:
        return list(pool.map(lambda body: client.post("/generate", json=body), bodies))


def test_concurrent_requests_with_different_adapters_batch_together_and_stay_isolated(client, tiny_base):
    prompts = [random_soft_prompt(tiny_base, 2 + i, seed=20 + i) for i in range(8)]
    ids = [upload_adapter(client, p, name=f"a{i}")["id"] for i, p in enumerate(prompts)]
    bodies = [{"adapter_id": ids[i], "prompt": PROMPTS[i % len(PROMPTS)], "max_new_tokens": 8} for i in range(8)]
    responses = post_concurrently(client, bodies)
    assert max(float(r.headers["X-Batch-Size"]) for r in responses) > 1
    for i, response in enumerate(responses):
        alone = generate_batch(tiny_base, [GenerationRequest(
            prompt_ids=tiny_base.tokenizer(bodies[i]["prompt"]).input_ids, soft_prompt=prompts[i], max_new_tokens=8)])[0]
        assert response.json()["text"] == alone.text
        assert response.json()["adapter_id"] == ids[i]


def test_unknown_adapter_is_404(client):
    response = client.post("/generate", json={"adapter_id": "nope", "prompt": "hi"})
    assert response.status_code == 404 and "nope" in response.json()["detail"]


def test_adapter_for_another_base_is_409(client, tiny_base):
    adapter_id = upload_adapter(client, random_soft_prompt(tiny_base, 3, seed=1))["id"]
    runtime = client.app.state.runtime
    with runtime.sessions() as session, session.begin():
        session.get(Adapter, adapter_id).base_fingerprint = "other@0000"
    response = client.post("/generate", json={"adapter_id": adapter_id, "prompt": "hi"})
    assert response.status_code == 409 and "other@0000" in response.json()["detail"]


@pytest.mark.parametrize(
    "body, field",
    [
        ({"prompt": "hi", "max_new_tokens": 0}, "max_new_tokens"),
        ({"prompt": "hi", "max_new_tokens": 10_000}, "max_new_tokens"),
        ({"prompt": "hi", "temperature": 2.5}, "temperature"),
        ({"prompt": "hi", "top_p": 0}, "top_p"),
        ({"prompt": ""}, "prompt"),
        ({"prompt": "hi", "stop": [""]}, "stop"),
        ({"prompt": "hi", "seed": -1}, "seed"),
        ({"prompt": "hi", "bogus": 1}, "bogus"),
        ({"max_new_tokens": 3}, "prompt"),
    ],
)
def test_out_of_range_parameters_get_422_naming_the_field(client, body, field):
    response = client.post("/generate", json=body)
    assert response.status_code == 422
    assert field in [str(part) for error in response.json()["detail"] for part in error["loc"]]


def test_prompt_over_the_token_limit_is_422(make_client, tiny_base):
    client = make_client(tiny_base, max_prompt_tokens=5)
    response = client.post("/generate", json={"prompt": "a gripping , funny and moving film about a boy"})
    assert response.status_code == 422 and response.json()["detail"][0]["loc"] == ["body", "prompt"]


def test_full_queue_answers_503_with_retry_after(make_client, tiny_base):
    client = make_client(tiny_base, max_queue_size=1, max_batch_size=1)
    responses = post_concurrently(client, [{"prompt": "a long story", "max_new_tokens": 200}] * 6)
    codes = sorted(r.status_code for r in responses)
    assert 200 in codes and 503 in codes, codes
    busy = next(r for r in responses if r.status_code == 503)
    assert busy.headers["Retry-After"] == "1" and "queue is full" in busy.json()["detail"]


def test_apply_template_lays_the_prompt_out_with_the_adapters_template(client, tiny_base):
    from app import registry

    runtime = client.app.state.runtime
    prompt = random_soft_prompt(tiny_base, 4, seed=9)
    with runtime.sessions() as session:
        adapter = registry.register_adapter(
            session, storage=runtime.storage, name="templated", prompt_embeddings=prompt,
            base_fingerprint=tiny_base.fingerprint, base_model_name="tiny", source="trained",
            template="Review: {input}\nSentiment:",
        )
    body = {"adapter_id": adapter.id, "prompt": "a fine film", "max_new_tokens": 6}
    templated = client.post("/generate", json=body | {"apply_template": True}).json()
    assert templated["text"] == expected_text(tiny_base, prompt, "Review: a fine film\nSentiment:", 6)
    assert templated["usage"]["prompt_tokens"] == len(tiny_base.tokenizer("Review: a fine film\nSentiment:").input_ids)
    assert client.post("/generate", json=body).json()["text"] == expected_text(tiny_base, prompt, "a fine film", 6)


def test_apply_template_without_a_template_is_422(client, tiny_base):
    adapter_id = upload_adapter(client, random_soft_prompt(tiny_base, 3, seed=2))["id"]  # imported: no template
    for body in ({"adapter_id": adapter_id}, {}):
        response = client.post("/generate", json=body | {"prompt": "hi", "apply_template": True})
        assert response.status_code == 422 and response.json()["detail"][0]["loc"] == ["body", "apply_template"]
