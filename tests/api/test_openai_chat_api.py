"""POST /v1/chat/completions, driven by the official `openai` client against a real server over
HTTP on the tiny model (whose tokenizer has no chat template: the plain one applies)."""

import httpx
import openai
import pytest

from app import chat_template
from app.engine.reference import reference_greedy_decode
from tests.api.test_openai_api import openai_client, upload
from tests.api.test_streaming import assert_leaving_frees_the_rows
from tests.conftest import random_soft_prompt

CHAT = [{"role": "system", "content": "Answer in one word."}, {"role": "user", "content": "a gripping , funny film"}]


@pytest.fixture
def server(make_live_server, tiny_base):
    return make_live_server(tiny_base)


@pytest.fixture
def client(server):
    return openai_client(server)


def reference_reply(base, soft_prompt, messages, n: int) -> tuple[str, list[int], list[int]]:
    """(text, prompt ids, reply ids) of the no-cache greedy decode of the rendered chat."""
    ids = chat_template.prompt_ids(base.tokenizer, messages)
    reply = reference_greedy_decode(base, soft_prompt, ids, n)
    return base.tokenizer.decode(reply, skip_special_tokens=True), ids, reply


def test_a_reply_with_an_adapter_is_the_reference_decode_of_the_rendered_chat(server, client, tiny_base):
    soft_prompt = random_soft_prompt(tiny_base, 7, seed=11)
    adapter_id = upload(server, soft_prompt)
    completion = client.chat.completions.create(model=adapter_id, messages=CHAT, max_completion_tokens=10,
                                                temperature=0)
    assert completion.id.startswith("chatcmpl-") and completion.object == "chat.completion"
    assert completion.model == adapter_id
    [choice] = completion.choices
    text, ids, reply = reference_reply(tiny_base, soft_prompt, CHAT, 10)
    assert choice.message.role == "assistant" and choice.message.content == text
    assert (choice.index, choice.logprobs, choice.finish_reason) == (0, None, "length")
    usage = completion.usage
    assert (usage.prompt_tokens, usage.completion_tokens, usage.total_tokens) == (len(ids), 10, len(ids) + 10)


def test_the_plain_template_is_what_the_model_sees(tiny_base):
    rendered = chat_template.render(tiny_base.tokenizer, CHAT + [{"role": "assistant", "content": "Great"},
                                                                 {"role": "developer", "content": "Now shorter."}], True)
    assert rendered == ("System: Answer in one word.\n\nUser: a gripping , funny film\n\nAssistant: Great<eos>\n\n"
                        "System: Now shorter.\n\nAssistant:")
    ids = chat_template.prompt_ids(tiny_base.tokenizer, CHAT)
    assert ids[0] == tiny_base.tokenizer.bos_token_id and ids.count(tiny_base.tokenizer.bos_token_id) == 1


def test_the_base_model_and_a_fine_tuned_name_resolve_like_completions(server, client, tiny_base):
    soft_prompt = random_soft_prompt(tiny_base, 5, seed=3)
    adapter_id = upload(server, soft_prompt)
    base_reply = client.chat.completions.create(model=tiny_base.name, messages=CHAT, max_tokens=6, temperature=0)
    assert base_reply.choices[0].message.content == reference_reply(tiny_base, None, CHAT, 6)[0]
    named = client.chat.completions.create(model=f"ft:{tiny_base.name}:mine:{adapter_id}", messages=CHAT,
                                           max_tokens=6, temperature=0)
    assert named.choices[0].message.content == reference_reply(tiny_base, soft_prompt, CHAT, 6)[0]


def test_text_parts_and_developer_messages_render_as_a_string_and_system(client, tiny_base):
    parts = [{"role": "developer", "content": [{"type": "text", "text": "Answer in one word."}]},
             {"role": "user", "content": [{"type": "text", "text": "a gripping ,"}, {"type": "text", "text": "funny"}]}]
    as_strings = [CHAT[0], {"role": "user", "content": "a gripping ,\nfunny"}]
    reply = client.chat.completions.create(model=tiny_base.name, messages=parts, max_tokens=6, temperature=0)
    assert reply.choices[0].message.content == reference_reply(tiny_base, None, as_strings, 6)[0]


def test_streamed_deltas_add_up_to_the_reply_with_usage_last(server, client, tiny_base):
    adapter_id = upload(server, random_soft_prompt(tiny_base, 6, seed=8))
    request = {"model": adapter_id, "messages": CHAT, "max_completion_tokens": 20, "temperature": 0}
    whole = client.chat.completions.create(**request)
    chunks = list(client.chat.completions.create(**request, stream=True, stream_options={"include_usage": True}))
    first, *middle, end, usage = chunks
    assert all(c.object == "chat.completion.chunk" for c in chunks) and len({c.id for c in chunks}) == 1
    assert first.choices[0].delta.role == "assistant" and first.choices[0].delta.content == ""
    assert "".join(c.choices[0].delta.content for c in middle) == whole.choices[0].message.content
    assert all(c.choices[0].finish_reason is None and c.usage is None for c in [first, *middle])
    assert end.choices[0].finish_reason == "length" and end.choices[0].delta.content is None
    assert usage.choices == [] and usage.usage == whole.usage


def test_without_include_usage_no_usage_chunk_is_sent(client, tiny_base):
    chunks = list(client.chat.completions.create(model=tiny_base.name, messages=CHAT, max_tokens=5, temperature=0,
                                                 stream=True))
    assert all(len(c.choices) == 1 and c.usage is None for c in chunks)
    assert chunks[-1].choices[0].finish_reason == "length"


def split_reply_stop(base, messages, n: int) -> tuple[str, str]:
    """A two-character stop string whose characters come from different tokens of the greedy
    reply, and the text before it."""
    text, _, tokens = reference_reply(base, None, messages, n)
    for k in range(1, len(tokens)):
        cut = len(base.tokenizer.decode(tokens[:k], skip_special_tokens=True))
        stop = text[cut - 1 : cut + 1]
        if cut > 4 and stop.isascii() and stop.isprintable() and text.find(stop) == cut - 1:
            return stop, text[: cut - 1]
    raise AssertionError(f"no stop string splits across tokens in {text!r}")


@pytest.mark.parametrize("stream", [False, True])
def test_the_reply_ends_before_a_stop_string(client, tiny_base, stream):
    stop, before = split_reply_stop(tiny_base, CHAT, 24)
    request = {"model": tiny_base.name, "messages": CHAT, "max_tokens": 24, "temperature": 0, "stop": stop}
    if stream:
        choices = [c.choices[0] for c in client.chat.completions.create(**request, stream=True)]
        text, finish_reason = "".join(c.delta.content or "" for c in choices), choices[-1].finish_reason
    else:
        choice = client.chat.completions.create(**request).choices[0]
        text, finish_reason = choice.message.content, choice.finish_reason
    assert (text, finish_reason) == (before, "stop")


def test_max_completion_tokens_wins_over_max_tokens_and_the_default_is_the_node_limit(make_live_server, tiny_base):
    client = openai_client(make_live_server(tiny_base, max_new_tokens_limit=12))
    asked = client.chat.completions.create(model=tiny_base.name, messages=CHAT, max_completion_tokens=3, max_tokens=9,
                                           temperature=0)
    assert asked.usage.completion_tokens == 3
    default = client.chat.completions.create(model=tiny_base.name, messages=CHAT, temperature=0)
    assert default.usage.completion_tokens == 12 and default.choices[0].finish_reason == "length"


def test_a_seed_makes_sampling_repeatable(client, tiny_base):
    def sample(seed):
        return client.chat.completions.create(model=tiny_base.name, messages=CHAT, max_tokens=16, seed=seed,
                                              temperature=1.5).choices[0].message.content

    assert sample(7) == sample(7) != sample(8)


def test_unknown_model_is_not_found(client):
    with pytest.raises(openai.NotFoundError) as raised:
        client.chat.completions.create(model="nope", messages=CHAT)
    assert "'nope' not found" in raised.value.message and raised.value.type == "invalid_request_error"


@pytest.mark.parametrize(
    "fields, param",
    [
        ({"messages": []}, "messages"),
        ({"messages": [{"role": "tool", "content": "42", "tool_call_id": "a"}]}, "messages"),
        ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]}, "messages"),
        ({"messages": [{"role": "user", "content": "hi", "name": "ann"}]}, "messages"),
        ({"messages": [{"role": "assistant", "content": None, "tool_calls": []}]}, "messages"),
        ({"max_completion_tokens": 10_000}, "max_completion_tokens"),
        ({"max_tokens": 10_000}, "max_tokens"),
        ({"temperature": 2.5}, "temperature"),
        ({"stop": ["a", "b", "c", "d", "e"]}, "stop"),
        ({"n": 2}, "n"),
        ({"logprobs": True}, "logprobs"),
        ({"top_logprobs": 3}, "top_logprobs"),
        ({"presence_penalty": 0.5}, "presence_penalty"),
        ({"frequency_penalty": -1}, "frequency_penalty"),
        ({"logit_bias": {"5": 10}}, "logit_bias"),
        ({"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
        ({"tool_choice": "required"}, "tool_choice"),
        ({"response_format": {"type": "json_object"}}, "response_format"),
        ({"modalities": ["text", "audio"]}, "modalities"),
    ],
)
def test_an_invalid_or_unsupported_field_is_named(client, tiny_base, fields, param):
    with pytest.raises(openai.UnprocessableEntityError) as raised:
        client.chat.completions.create(**{"model": tiny_base.name, "messages": CHAT} | fields)
    assert raised.value.param == param and param in raised.value.message


def test_a_chat_over_the_prompt_limit_is_named(make_live_server, tiny_base):
    client = openai_client(make_live_server(tiny_base, max_prompt_tokens=8))
    with pytest.raises(openai.UnprocessableEntityError) as raised:
        client.chat.completions.create(model=tiny_base.name, messages=CHAT, max_tokens=2)
    assert raised.value.param == "messages" and "the limit is 8" in raised.value.message


def test_values_that_ask_for_nothing_and_unknown_fields_are_accepted(client, tiny_base):
    completion = client.chat.completions.create(
        model=tiny_base.name, messages=CHAT, max_tokens=2, n=1, logprobs=False, presence_penalty=0,
        frequency_penalty=0, logit_bias={}, tools=[], tool_choice="none", response_format={"type": "text"},
        user="someone", store=False, metadata={"a": "b"}, extra_body={"not_an_openai_field": 1},
    )
    assert len(completion.choices) == 1


def test_a_body_that_is_not_json_gets_openais_error_shape(server):
    response = httpx.post(server.url + "/v1/chat/completions", content=b"{", headers={"content-type": "application/json"})
    assert response.status_code == 422 and response.json()["error"]["type"] == "invalid_request_error"


def test_a_client_that_leaves_a_stream_frees_its_row(make_live_server, tiny_base):
    server = make_live_server(tiny_base)
    body = {"model": tiny_base.name, "messages": CHAT, "temperature": 0, "stream": True,
            "max_completion_tokens": server.runtime.settings.max_new_tokens_limit}
    assert_leaving_frees_the_rows(server, "/v1/chat/completions", body, rows=1)
