"""The engine as the API shows it: KV and prefix cache figures, requests too large for the KV
cache, timing headers, and adapters that are deleted or change under the same id."""

import time

from app import adapter_files
from app.models import Adapter
from app.storage import adapter_key
from tests.api.test_generate_api import PROMPTS, expected_text
from tests.conftest import random_soft_prompt, upload_adapter


def engine_stats(client) -> dict:
    return client.get("/health").json()["engine"]


def test_health_reports_the_kv_cache_and_the_prefix_cache(make_client, tiny_base):
    client = make_client(tiny_base, kv_cache_tokens=2048, prefix_cache_tokens=512)
    adapter_id = upload_adapter(client, random_soft_prompt(tiny_base, 6, seed=1))["id"]
    for prompt in PROMPTS[:2]:
        assert client.post("/generate", json={"adapter_id": adapter_id, "prompt": prompt, "max_new_tokens": 4}).status_code == 200
    stats = engine_stats(client)
    kv, prefix = stats["kv_cache"], stats["prefix_cache"]
    assert kv["capacity_tokens"] == 2048 and kv["reserved_tokens"] == 0 and 0 < kv["used_tokens"] <= 2048
    assert kv["bytes_per_token"] == 2 * 2 * 1 * 32 * 4  # K and V, 2 layers, 1 KV head of 32, float32
    assert prefix["capacity_tokens"] == 512 and prefix["entries"] == 1 and prefix["hits"] == 1
    assert prefix["reused_tokens"] >= 6  # the second request read the soft prompt from the cache
    assert stats["requests_admitted"] == 2 and stats["running"] == 0 and stats["waiting"] == 0


def test_timing_headers_say_where_the_time_went(make_client, tiny_base):
    client = make_client(tiny_base)
    response = client.post("/generate", json={"prompt": PROMPTS[0], "max_new_tokens": 6})
    queue, first, engine = (float(response.headers[h]) for h in ("X-Queue-Time", "X-Time-To-First-Token", "X-Inference-Time"))
    assert 0 <= queue <= first <= queue + engine
    assert float(response.headers["X-Batch-Size"]) == 1.0


def test_a_request_the_kv_cache_can_never_hold_is_422_naming_the_field(make_client, tiny_base):
    client = make_client(tiny_base, kv_cache_tokens=64)
    response = client.post("/generate", json={"prompt": PROMPTS[0], "max_new_tokens": 100})
    assert response.status_code == 422
    [error] = response.json()["detail"]
    assert error["loc"] == ["body", "max_new_tokens"] and "the cache holds 64" in error["msg"]
    openai = client.post("/v1/completions", json={"model": tiny_base.name, "prompt": PROMPTS[0], "max_tokens": 100})
    assert openai.status_code == 422 and openai.json()["error"]["param"] == "max_tokens"
    assert client.post("/generate", json={"prompt": PROMPTS[0], "max_new_tokens": 20}).status_code == 200


def test_deleting_an_adapter_frees_its_cached_prefix(make_client, tiny_base):
    client = make_client(tiny_base)
    adapter_id = upload_adapter(client, random_soft_prompt(tiny_base, 12, seed=2))["id"]
    client.post("/generate", json={"adapter_id": adapter_id, "prompt": PROMPTS[0], "max_new_tokens": 3})
    assert engine_stats(client)["prefix_cache"]["entries"] == 1
    assert client.delete(f"/adapters/{adapter_id}").status_code == 204
    deadline = time.monotonic() + 5
    while engine_stats(client)["prefix_cache"]["entries"]:
        assert time.monotonic() < deadline, "the deleted adapter's prefix is still cached"
        time.sleep(0.01)
    assert engine_stats(client)["kv_cache"]["used_tokens"] == 0


def test_an_adapter_whose_content_changes_under_the_same_id_is_never_served_stale(make_client, tiny_base):
    """As when another node re-registers an id: the registry's hash changes, and neither the
    soft prompt nor the prefix computed from the old content is used again."""
    client = make_client(tiny_base)
    runtime = client.app.state.runtime
    old, new = random_soft_prompt(tiny_base, 6, seed=3), random_soft_prompt(tiny_base, 6, seed=4)
    adapter_id = upload_adapter(client, old)["id"]
    body = {"adapter_id": adapter_id, "prompt": PROMPTS[0], "max_new_tokens": 8}
    assert client.post("/generate", json=body).json()["text"] == expected_text(tiny_base, old, PROMPTS[0], 8)
    key = adapter_key(adapter_id)
    runtime.storage.delete(key)
    files = adapter_files.encode_adapter(new, tiny_base.fingerprint, tiny_base.name)
    with runtime.sessions() as session, runtime.storage.storing(session, key, files):
        session.get(Adapter, adapter_id).sha256 = adapter_files.content_sha256(new)
        session.commit()
    expected = expected_text(tiny_base, new, PROMPTS[0], 8)
    assert expected != expected_text(tiny_base, old, PROMPTS[0], 8)
    assert client.post("/generate", json=body).json()["text"] == expected
    assert engine_stats(client)["prefix_cache"]["hits"] == 0  # the old prefix was never read
