"""/metrics in Prometheus' text format, request ids and request log lines."""

import json
import logging

from prometheus_client.parser import text_string_to_metric_families

from app.observability import AdapterLabels, JsonFormatter
from tests.conftest import random_soft_prompt, upload_adapter
from tests.worker.test_end_to_end import sst2_slice


def scrape(client) -> dict[tuple[str, tuple], float]:
    response = client.get("/metrics")
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/plain")
    return {(sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for family in text_string_to_metric_families(response.text) for sample in family.samples}


def value(samples, name, **labels) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def test_counters_move_with_requests_and_jobs(make_client, tiny_base):
    client = make_client(tiny_base)
    adapter = upload_adapter(client, random_soft_prompt(tiny_base, 4, 0))["id"]
    before = scrape(client)
    for body in ({"prompt": "hello", "max_new_tokens": 3}, {"adapter_id": adapter, "prompt": "hi", "max_new_tokens": 3}):
        assert client.post("/generate", json=body).status_code == 200
    assert client.post("/generate", json={"adapter_id": "nope", "prompt": "hi"}).status_code == 404
    assert client.post("/train-jobs", files={"file": ("t.jsonl", sst2_slice("train", 8))}).status_code == 202
    after = scrape(client)

    def moved(name, **labels):
        return value(after, name, **labels) - value(before, name, **labels)

    assert moved("softserve_http_requests_total", method="POST", route="/generate", status="200") == 2
    assert moved("softserve_http_requests_total", method="POST", route="/generate", status="404") == 1
    assert moved("softserve_http_request_duration_seconds_count", method="POST", route="/generate") == 3
    assert moved("softserve_adapter_requests_total", adapter=adapter, status="200") == 1
    assert moved("softserve_adapter_requests_total", adapter="base", status="200") == 1
    assert moved("softserve_adapter_requests_total", adapter="nope", status="404") == 1
    assert moved("softserve_tokens_generated_total") >= 2 and moved("softserve_engine_steps_total") >= 2
    assert moved("softserve_engine_step_seconds_total") > 0
    assert value(after, "softserve_jobs", status="queued") == 1
    plan = client.app.state.runtime.engine.core.memory_plan  # the pool as the memory plan sized it
    assert value(after, "softserve_kv_cache_capacity_tokens") == plan.kv_cache_tokens > 0
    assert value(after, "softserve_memory_plan_bytes", part="kv_cache") == plan.kv_cache_bytes
    assert value(after, "softserve_memory_plan_bytes", part="weights") == plan.weights_bytes > 0
    assert value(after, "softserve_adapter_cache_misses_total") >= 1
    assert value(after, "softserve_adapter_load_seconds_total") > 0  # the adapter's first use loaded it
    assert moved("softserve_registry_lookups_total") == 2  # the adapter and "nope"; the base model has none
    assert moved("softserve_registry_lookup_seconds_total") > 0


def test_request_ids_are_taken_or_made_and_every_request_is_logged(make_client, tiny_base, caplog):
    client = make_client(tiny_base)
    with caplog.at_level(logging.INFO, logger="softserve.requests"):
        given = client.get("/health", headers={"X-Request-ID": "trace-42"})
        made = client.get("/health", headers={"X-Request-ID": "not a valid id \x7f"})
        client.post("/generate", json={"prompt": "hello", "max_new_tokens": 2})
    assert given.headers["x-request-id"] == "trace-42"
    assert made.headers["x-request-id"] != "not a valid id \x7f" and len(made.headers["x-request-id"]) == 16
    lines = [json.loads(JsonFormatter().format(record)) for record in caplog.records if record.name == "softserve.requests"]
    assert [(line["request_id"], line["route"], line["status"]) for line in lines[:2]] == [
        ("trace-42", "/health", 200), (made.headers["x-request-id"], "/health", 200)]
    generated = lines[2]
    assert generated["route"] == "/generate" and generated["adapter_id"] is None and generated["duration_ms"] > 0


def test_adapter_labels_are_bounded():
    label = AdapterLabels(limit=2)
    assert [label(a) for a in ("a", "b", "c", "a", None, "d", "b")] == ["a", "b", "other", "a", "base", "other", "b"]
