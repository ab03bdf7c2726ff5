"""Issue 9, items 1, 7 and 9: one request cannot fail or starve the others in the engine.

- a poison row (a temperature that underflows softmax) among normal ones fails nobody;
- a non-streaming client that hangs up frees its rows (as a streaming one does);
- the work one call may queue is bounded in KV positions, not only in requests.
"""

import json
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from app.engine.generation import generate_batch
from app.engine.requests import GenerationRequest
from tests.api.test_generate_api import PROMPTS, post_concurrently
from tests.conftest import before_each_forward, random_soft_prompt, upload_adapter


@pytest.fixture
def client(make_client, tiny_base):
    return make_client(tiny_base)


@pytest.mark.parametrize("poison", [{"temperature": 1e-300}, {"temperature": 5e-324}, {"temperature": 1e-40},
                                    {"temperature": 2.0, "top_p": 1e-300}])
def test_a_poison_request_among_eight_fails_none_of_them(client, tiny_base, poison):
    soft_prompts = [random_soft_prompt(tiny_base, 3 + i, seed=40 + i) for i in range(8)]
    ids = [upload_adapter(client, p, name=f"n{i}")["id"] for i, p in enumerate(soft_prompts)]
    bodies = [{"adapter_id": ids[i], "prompt": PROMPTS[i % len(PROMPTS)], "max_new_tokens": 6} for i in range(8)]
    poisoned = {"adapter_id": ids[0], "prompt": PROMPTS[1], "max_new_tokens": 6, "seed": 1} | poison
    # the poison row shares steps with the others: every step waits for the whole group to queue
    before_each_forward(client.app.state.runtime.engine, lambda n: time.sleep(0.01))
    *responses, poison_response = post_concurrently(client, [*bodies, poisoned])
    assert poison_response.status_code == 200, poison_response.text
    assert max(float(r.headers["X-Batch-Size"]) for r in responses) > 1
    for body, soft_prompt, response in zip(bodies, soft_prompts, responses):
        assert response.status_code == 200, response.text
        alone = generate_batch(tiny_base, [GenerationRequest(
            tiny_base.tokenizer(body["prompt"]).input_ids, soft_prompt, max_new_tokens=6)])[0]
        assert response.json()["text"] == alone.text


def wait_for(condition, what: str) -> None:
    deadline = time.monotonic() + 10
    while not condition():
        assert time.monotonic() < deadline, what
        time.sleep(0.02)


def post_and_hang_up(server, path: str, body: dict, until) -> None:
    """Send a plain (non-streaming) request over a raw connection; close it once `until()` holds."""
    data = json.dumps(body).encode()
    head = (f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(data)}\r\n\r\n")
    with socket.create_connection(("127.0.0.1", server.port)) as connection:
        connection.sendall(head.encode() + data)
        wait_for(until, "the request's rows are running")


@pytest.mark.parametrize("path, body, rows", [
    ("/generate", {"prompt": PROMPTS[0]}, 1),
    ("/v1/completions", {"model": "{base}", "prompt": PROMPTS[:3]}, 3),
])
def test_a_non_streaming_client_that_hangs_up_frees_its_rows(make_live_server, tiny_base, path, body, rows):
    server = make_live_server(tiny_base)
    engine, limit = server.runtime.engine, server.runtime.settings.max_new_tokens_limit
    tokens = "max_new_tokens" if path == "/generate" else "max_tokens"
    body = body | {tokens: limit} | ({"model": tiny_base.name} if "model" in body else {})
    before_each_forward(engine, lambda n: time.sleep(0.005))  # a long generation outlasts the client
    post_and_hang_up(server, path, body, until=lambda: len(engine.core.running) == rows)
    wait_for(lambda: engine.requests_cancelled == rows and not engine.core.running,
             f"{engine.requests_cancelled} of {rows} rows cancelled")
    assert engine.core.requests_admitted == rows
    assert engine.core.tokens_generated < rows * limit / 4, engine.core.tokens_generated


def test_one_call_cannot_queue_more_work_than_the_whole_queue_holds(make_client, tiny_base):
    client = make_client(tiny_base, max_queued_tokens=1024)
    engine = client.app.state.runtime.engine
    prompts = ["word " * 200] * 8  # ~400 tokens + 64 new each: ~3,700 positions in all
    response = client.post("/v1/completions", json={"model": tiny_base.name, "prompt": prompts, "max_tokens": 64})
    assert response.status_code == 422, response.text
    error = response.json()["error"]
    assert error["param"] == "prompt" and "at most 1024 may wait at once" in error["message"]
    assert engine.core.requests_admitted == 0
    # the same prompts in calls that fit run
    response = client.post("/v1/completions", json={"model": tiny_base.name, "prompt": prompts[:2], "max_tokens": 2})
    assert response.status_code == 200, response.text


def test_queued_work_is_bounded_in_kv_positions_and_a_refused_call_queues_nothing(make_live_server, tiny_base):
    server = make_live_server(tiny_base, max_queued_tokens=600, max_batch_size=1)
    engine = server.runtime.engine
    started, release = threading.Event(), threading.Event()
    before_each_forward(engine, lambda n: started.set() or release.wait(30))  # holds the first request
    long_prompt = "word " * 200  # ~400 tokens
    with httpx.Client(base_url=server.url, timeout=30) as http, ThreadPoolExecutor(2) as pool:
        running = pool.submit(http.post, "/generate", json={"prompt": PROMPTS[0], "max_new_tokens": 2})
        assert started.wait(10)
        waiting = pool.submit(http.post, "/generate", json={"prompt": long_prompt, "max_new_tokens": 100})
        wait_for(lambda: engine.queue_depth == 1, "the second request waits")
        # queue places are free, but not the KV positions for both prompts: neither is queued
        refused = http.post("/v1/completions", json={"model": tiny_base.name, "prompt": [PROMPTS[0]] * 2,
                                                     "max_tokens": 100})
        assert refused.status_code == 503 and refused.headers["Retry-After"] == "1", refused.text
        assert engine.queue_depth == 1 and engine.stats()["queued_tokens"] > 400
        release.set()
        assert running.result().status_code == 200 and waiting.result().status_code == 200
    assert engine.core.requests_admitted == 2
