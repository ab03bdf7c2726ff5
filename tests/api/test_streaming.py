"""Streaming: POST /generate as server-sent events, the text pieces that are safe to send, the
merge of several rows' streams, and a client that leaves mid-stream over real HTTP."""

import asyncio
import json
import time

import httpx
import pytest

from app.api.streaming import merge
from app.engine.reference import reference_greedy_decode
from app.engine.text_stream import TextDeltas
from tests.api.test_generate_api import PROMPTS, expected_text
from tests.conftest import before_each_forward, random_soft_prompt, upload_adapter


def sse_payloads(lines) -> list[dict]:
    """The JSON payloads of a stream's `data:` events; the stream must end with `data: [DONE]`."""
    data = [line.removeprefix("data: ") for line in lines if line]
    assert all(line.startswith("data: ") for line in lines if line), lines
    assert data[-1] == "[DONE]"
    return [json.loads(payload) for payload in data[:-1]]


def split_stop(base, soft_prompt, prompt: str, max_new_tokens: int) -> tuple[str, str]:
    """A two-character stop string whose characters come from different tokens of the greedy
    output, and the text before it: the first half must be held back until the second arrives."""
    tokens = reference_greedy_decode(base, soft_prompt, base.tokenizer(prompt).input_ids, max_new_tokens)
    text = base.tokenizer.decode(tokens, skip_special_tokens=True)
    for k in range(1, len(tokens)):
        cut = len(base.tokenizer.decode(tokens[:k], skip_special_tokens=True))
        stop = text[cut - 1 : cut + 1]
        if cut > 4 and stop.isascii() and stop.isprintable() and text.find(stop) == cut - 1:
            return stop, text[: cut - 1]
    raise AssertionError(f"no stop string splits across tokens in {text!r}")


def fail_at_third_step(n: int) -> None:
    if n == 3:
        raise RuntimeError("device lost")


def assert_leaving_frees_the_rows(server, path: str, body: dict, rows: int) -> None:
    """Read one event of a long stream of `rows` rows, hang up, and see every row cancelled
    long before it could have reached its token limit."""
    engine, limit = server.runtime.engine, server.runtime.settings.max_new_tokens_limit
    before_each_forward(engine, lambda n: time.sleep(0.005))  # a long generation outlasts the client
    with httpx.Client(base_url=server.url, timeout=30) as http:
        with http.stream("POST", path, json=body) as response:
            assert response.status_code == 200
            assert next(response.iter_lines()).startswith("data: {")
            # a chat stream's first event (the role) can precede admission: hang up mid-generation
            # (a generous deadline: a fresh server's first step is slow when the suite fills the RAM)
            deadline = time.monotonic() + 60
            while engine.core.requests_admitted < rows:
                assert time.monotonic() < deadline, f"{engine.core.requests_admitted} of {rows} rows admitted"
                time.sleep(0.005)
    deadline = time.monotonic() + 10
    while engine.requests_cancelled < rows or engine.core.running:
        assert time.monotonic() < deadline, f"{engine.requests_cancelled} of {rows} rows cancelled"
        time.sleep(0.02)
    assert engine.requests_cancelled == rows and engine.core.requests_admitted == rows
    assert engine.core.tokens_generated < rows * limit / 4, engine.core.tokens_generated


@pytest.fixture
def client(make_client, tiny_base):
    return make_client(tiny_base)


def stream_generate(client, body: dict) -> list[dict]:
    with client.stream("POST", "/generate", json=body | {"stream": True}) as response:
        assert response.status_code == 200 and response.headers["content-type"].startswith("text/event-stream")
        return sse_payloads(list(response.iter_lines()))


def test_streamed_events_add_up_to_the_whole_completion(client, tiny_base):
    prompt = random_soft_prompt(tiny_base, 5, seed=3)
    adapter_id = upload_adapter(client, prompt)["id"]
    body = {"adapter_id": adapter_id, "prompt": PROMPTS[0], "max_new_tokens": 24}
    whole = client.post("/generate", json=body).json()
    events = stream_generate(client, body)
    assert len(events) > 2
    assert "".join(e["text"] for e in events) == whole["text"] == expected_text(tiny_base, prompt, PROMPTS[0], 24)
    assert all(e["finish_reason"] is None and "usage" not in e for e in events[:-1])
    assert events[-1]["finish_reason"] == "length" and events[-1]["adapter_id"] == adapter_id
    assert events[-1]["usage"] == whole["usage"]


def test_stream_stops_before_a_stop_string_split_across_tokens(client, tiny_base):
    stop, before = split_stop(tiny_base, None, PROMPTS[2], 24)
    body = {"prompt": PROMPTS[2], "max_new_tokens": 24, "stop": [stop]}
    events = stream_generate(client, body)
    assert "".join(e["text"] for e in events) == before == client.post("/generate", json=body).json()["text"]
    assert events[-1]["finish_reason"] == "stop"


def test_a_batch_that_fails_mid_stream_ends_it_with_an_error_event_that_keeps_internals_in(client):
    before_each_forward(client.app.state.runtime.engine, fail_at_third_step)
    body = {"prompt": PROMPTS[0], "max_new_tokens": 20, "stream": True}
    with client.stream("POST", "/generate", json=body, headers={"X-Request-ID": "req-42"}) as response:
        events = sse_payloads(list(response.iter_lines()))
    assert events[-1] == {"error": {"message": "generation failed: an internal error in the engine ended this request; "
                                               "the engine recovered, retry it (request id req-42)",
                                    "type": "server_error"}}
    assert all("error" not in e for e in events[:-1])
    assert client.post("/generate", json={"prompt": PROMPTS[1], "max_new_tokens": 3}).status_code == 200


def test_a_stop_string_split_across_tokens_is_never_sent():
    deltas = TextDeltas(["END"])
    # The engine cuts the stop string off the text once it is complete.
    assert [deltas.next("so E", False), deltas.next("so EN", False), deltas.next("so ", True)] == ["so ", "", ""]


def test_a_held_back_ending_is_sent_once_it_cannot_start_a_stop_string():
    deltas = TextDeltas(["END"])
    assert [deltas.next("E", False), deltas.next("EN", False), deltas.next("ENx", False)] == ["", "", "ENx"]


def test_half_a_character_is_held_back_until_it_is_complete():
    deltas = TextDeltas()
    assert [deltas.next("caf\ufffd", False), deltas.next("café", False), deltas.next("café\ufffd", True)] == [
        "caf", "é", "\ufffd",  # at the end everything is sent
    ]


async def counting(tag: str, n: int, closed: list[str]):
    try:
        for i in range(n):
            await asyncio.sleep(0.001)
            yield f"{tag}{i}"
    finally:
        closed.append(tag)


async def test_merge_tags_items_with_their_source_in_order():
    closed = []
    items = [item async for item in merge([counting("a", 5, closed), counting("b", 3, closed)])]
    assert [text for index, text in items if index == 0] == ["a0", "a1", "a2", "a3", "a4"]
    assert [text for index, text in items if index == 1] == ["b0", "b1", "b2"]
    assert sorted(closed) == ["a", "b"]


async def test_closing_a_merge_early_closes_every_source():
    closed = []
    merged = merge([counting("a", 1000, closed), counting("b", 1000, closed)])
    await anext(merged)
    await merged.aclose()
    await asyncio.sleep(0.01)  # the cancellations reach the sources
    assert sorted(closed) == ["a", "b"]


async def test_a_failing_source_ends_the_merge_with_its_error():
    async def failing():
        yield "x"
        raise ValueError("batch failed")

    closed = []
    with pytest.raises(ValueError, match="batch failed"):
        async for _ in merge([failing(), counting("a", 1000, closed)]):
            pass
    await asyncio.sleep(0.01)
    assert closed == ["a"]


def test_a_client_that_leaves_frees_its_row(make_live_server, tiny_base):
    server = make_live_server(tiny_base)
    limit = server.runtime.settings.max_new_tokens_limit
    body = {"prompt": PROMPTS[0], "max_new_tokens": limit, "stream": True}
    assert_leaving_frees_the_rows(server, "/generate", body, rows=1)
