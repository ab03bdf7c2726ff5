"""The OpenAI-compatible API (/v1/completions, /v1/models), driven by the official `openai`
client against a real server over HTTP."""

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest

from app import registry
from app.models import Adapter
from tests.api.test_generate_api import PROMPTS, expected_text
from tests.api.test_streaming import assert_leaving_frees_the_rows, fail_at_third_step, split_stop
from tests.conftest import before_each_forward, random_soft_prompt, upload_adapter


@pytest.fixture
def server(make_live_server, tiny_base):
    return make_live_server(tiny_base)


def openai_client(server) -> openai.OpenAI:
    # Open mode ignores credentials; no retries, so a refusal shows at once.
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)


@pytest.fixture
def client(server):
    return openai_client(server)


def upload(server, prompt, **kwargs) -> str:
    with httpx.Client(base_url=server.url) as http:
        return upload_adapter(http, prompt, **kwargs)["id"]


def prompt_tokens(base, prompt: str) -> int:
    return len(base.tokenizer(prompt).input_ids)


def test_completion_with_an_adapter_matches_the_greedy_reference(server, client, tiny_base):
    soft_prompt = random_soft_prompt(tiny_base, 7, seed=11)
    adapter_id = upload(server, soft_prompt)
    completion = client.completions.create(model=adapter_id, prompt=PROMPTS[0], max_tokens=10, temperature=0)
    assert completion.id.startswith("cmpl-") and completion.object == "text_completion"
    assert completion.model == adapter_id
    [choice] = completion.choices
    assert choice.text == expected_text(tiny_base, soft_prompt, PROMPTS[0], 10)
    assert (choice.index, choice.logprobs, choice.finish_reason) == (0, None, "length")
    n = prompt_tokens(tiny_base, PROMPTS[0])
    usage = completion.usage
    assert (usage.prompt_tokens, usage.completion_tokens, usage.total_tokens) == (n, 10, n + 10)


def test_the_base_model_is_named_by_its_name(client, tiny_base):
    completion = client.completions.create(model=tiny_base.name, prompt=PROMPTS[1], max_tokens=6, temperature=0)
    assert completion.choices[0].text == expected_text(tiny_base, None, PROMPTS[1], 6)


def test_max_tokens_defaults_to_16_like_openai(client, tiny_base):
    completion = client.completions.create(model=tiny_base.name, prompt=PROMPTS[0], temperature=0)
    assert completion.usage.completion_tokens == 16


def test_a_list_of_prompts_gives_one_choice_each_in_order_from_one_batch(server, client, tiny_base):
    soft_prompt = random_soft_prompt(tiny_base, 4, seed=5)
    adapter_id = upload(server, soft_prompt)
    sampled = before_each_forward(server.runtime.engine, lambda n: None)
    completion = client.completions.create(model=adapter_id, prompt=PROMPTS[:3], max_tokens=8, temperature=0)
    assert [c.index for c in completion.choices] == [0, 1, 2]
    assert [c.text for c in completion.choices] == [expected_text(tiny_base, soft_prompt, p, 8) for p in PROMPTS[:3]]
    assert completion.usage.prompt_tokens == sum(prompt_tokens(tiny_base, p) for p in PROMPTS[:3])
    assert completion.usage.completion_tokens == 24
    assert max(sampled) == 3  # the three rows decode in the same forward passes


def test_streamed_chunks_add_up_to_each_choice_with_usage_last(server, client, tiny_base):
    adapter_id = upload(server, random_soft_prompt(tiny_base, 6, seed=8))
    request = {"model": adapter_id, "prompt": PROMPTS[:2], "max_tokens": 20, "temperature": 0}
    whole = client.completions.create(**request)
    chunks = list(client.completions.create(**request, stream=True, stream_options={"include_usage": True}))
    *pieces, last = chunks
    assert last.choices == [] and last.usage == whole.usage
    assert all(len(c.choices) == 1 and c.usage is None and c.object == "text_completion" for c in pieces)
    assert len({c.id for c in chunks}) == 1
    for choice in whole.choices:
        mine = [c.choices[0] for c in pieces if c.choices[0].index == choice.index]
        assert "".join(c.text for c in mine) == choice.text
        assert [c.finish_reason for c in mine] == [None] * (len(mine) - 1) + ["length"]


def test_without_include_usage_no_usage_chunk_is_sent(client, tiny_base):
    chunks = list(client.completions.create(model=tiny_base.name, prompt=PROMPTS[0], max_tokens=5, temperature=0, stream=True))
    assert chunks and all(len(c.choices) == 1 and c.usage is None for c in chunks)
    assert chunks[-1].choices[0].finish_reason == "length"


def test_a_batch_that_fails_mid_stream_raises_in_the_client(server, client, tiny_base):
    before_each_forward(server.runtime.engine, fail_at_third_step)
    with pytest.raises(openai.APIError, match="generation failed: an internal error in the engine") as raised:
        list(client.completions.create(model=tiny_base.name, prompt=PROMPTS[:2], max_tokens=20, temperature=0, stream=True))
    assert "device lost" not in str(raised.value)


@pytest.mark.parametrize("stream", [False, True])
def test_text_ends_before_a_stop_string(client, tiny_base, stream):
    stop, before = split_stop(tiny_base, None, PROMPTS[2], 24)
    request = {"model": tiny_base.name, "prompt": PROMPTS[2], "max_tokens": 24, "temperature": 0, "stop": stop}
    if stream:
        choices = [c.choices[0] for c in client.completions.create(**request, stream=True)]
        text, finish_reason = "".join(c.text for c in choices), choices[-1].finish_reason
    else:
        choice = client.completions.create(**request).choices[0]
        text, finish_reason = choice.text, choice.finish_reason
    assert (text, finish_reason) == (before, "stop")


def test_a_seed_makes_sampling_repeatable(client, tiny_base):
    def sample(seed, **temperature):
        request = {"model": tiny_base.name, "prompt": PROMPTS[3], "max_tokens": 16, "seed": seed} | temperature
        return client.completions.create(**request).choices[0].text

    assert sample(7, temperature=1.5) == sample(7, temperature=1.5) != sample(8, temperature=1.5)
    # OpenAI's default temperature is 1: sampled, not greedy
    assert sample(7) == sample(7) != expected_text(tiny_base, None, PROMPTS[3], 16)


def test_unknown_model_is_not_found(client):
    with pytest.raises(openai.NotFoundError) as raised:
        client.completions.create(model="nope", prompt="hi")
    assert raised.value.status_code == 404 and "'nope' not found" in raised.value.message
    assert raised.value.type == "invalid_request_error"


@pytest.mark.parametrize(
    "fields, param",
    [
        ({"max_tokens": 10_000}, "max_tokens"),
        ({"temperature": 2.5}, "temperature"),
        ({"stop": ["a", "b", "c", "d", "e"]}, "stop"),
        ({"n": 2}, "n"),
        ({"best_of": 2}, "best_of"),
        ({"logprobs": 1}, "logprobs"),
        ({"echo": True}, "echo"),
        ({"suffix": "end"}, "suffix"),
        ({"presence_penalty": 0.5}, "presence_penalty"),
        ({"logit_bias": {"5": 10}}, "logit_bias"),
        ({"prompt": []}, "prompt"),
    ],
)
def test_an_invalid_or_unsupported_field_is_named(client, tiny_base, fields, param):
    with pytest.raises(openai.UnprocessableEntityError) as raised:
        client.completions.create(**{"model": tiny_base.name, "prompt": "hi"} | fields)
    assert raised.value.param == param and param in raised.value.message


def test_default_values_of_unsupported_fields_and_unknown_fields_are_accepted(client, tiny_base):
    completion = client.completions.create(
        model=tiny_base.name, prompt="hi", max_tokens=2, n=1, best_of=1, echo=False, logprobs=None,
        presence_penalty=0, frequency_penalty=0, logit_bias={}, user="someone", extra_body={"not_an_openai_field": 1},
    )
    assert len(completion.choices) == 1


def test_models_lists_the_base_model_then_its_adapters(server, client, tiny_base):
    first = upload(server, random_soft_prompt(tiny_base, 3, seed=1), name="first")
    second = upload(server, random_soft_prompt(tiny_base, 3, seed=2), name="second")
    foreign = upload(server, random_soft_prompt(tiny_base, 3, seed=3), name="foreign")
    checkpoint = upload(server, random_soft_prompt(tiny_base, 3, seed=4), name="checkpoint")
    with server.runtime.sessions() as session, session.begin():
        session.get(Adapter, foreign).base_fingerprint = "other@0000"
        session.get(Adapter, checkpoint).source = registry.CHECKPOINT  # listed with its job, not here
    models = client.models.list().data
    assert [m.id for m in models] == [tiny_base.name, second, first]
    assert all(m.object == "model" and m.owned_by == "softserve" for m in models)
    assert models[1].created >= models[2].created > 0


def test_a_client_that_leaves_a_stream_frees_every_row(make_live_server, tiny_base):
    server = make_live_server(tiny_base)
    limit = server.runtime.settings.max_new_tokens_limit
    body = {"model": tiny_base.name, "prompt": PROMPTS[:2], "max_tokens": limit, "temperature": 0, "stream": True}
    assert_leaving_frees_the_rows(server, "/v1/completions", body, rows=2)


def test_more_prompts_than_the_queue_holds_is_a_422_not_a_retry(make_live_server, tiny_base):
    server = make_live_server(tiny_base, max_queue_size=2)
    with pytest.raises(openai.UnprocessableEntityError) as raised:
        openai_client(server).completions.create(model=tiny_base.name, prompt=PROMPTS[:3], max_tokens=2)
    assert raised.value.body["param"] == "prompt" and "more than the queue holds (2)" in raised.value.message


def test_a_full_queue_refuses_a_list_of_prompts_and_runs_none_of_them(make_live_server, tiny_base):
    server = make_live_server(tiny_base, max_queue_size=2, max_batch_size=1)
    engine, client = server.runtime.engine, openai_client(server)
    started, release = threading.Event(), threading.Event()
    before_each_forward(engine, lambda n: started.set() or release.wait(30))  # holds the first request's steps

    def wait_until(condition):
        deadline = time.monotonic() + 10
        while not condition():
            assert time.monotonic() < deadline
            time.sleep(0.02)

    with ThreadPoolExecutor(2) as pool:
        single = {"model": tiny_base.name, "prompt": PROMPTS[0], "max_tokens": 2, "temperature": 0}
        running = pool.submit(client.completions.create, **single)
        assert started.wait(10)  # it is running, and held
        waiting = pool.submit(client.completions.create, **single)
        wait_until(lambda: engine.queue_depth == 1)  # one of two places is taken
        for stream in (False, True):  # one place is free and the list needs two: refused whole
            with pytest.raises(openai.InternalServerError) as raised:
                client.completions.create(model=tiny_base.name, prompt=PROMPTS[:2], max_tokens=2, temperature=0,
                                          stream=stream)
            assert raised.value.status_code == 503 and raised.value.response.headers["Retry-After"] == "1"
        release.set()
        assert running.result().choices[0].text and waiting.result().choices[0].text
    assert engine.requests_cancelled == 0  # all or none: no prompt of the lists was ever queued
    assert engine.core.requests_admitted == 2  # the two single requests only: the lists' prompts never ran
