"""The service on each real model (Gemma 3 270M, the default, and SmolLM2 135M), int8, over HTTP."""

import pytest

from app import chat_template
from app.adapter_files import CONFIG_NAME, WEIGHTS_NAME, encode_prefix_adapter
from app.engine.prefix_kv import to_flat
from app.engine.reference import check_against_reference
from app.engine.requests import SoftPrompt
from tests.conftest import (
    INT8_TIE_TOLERANCE,
    random_prefix_kv,
    random_soft_prompt,
    upload_adapter,
)

pytestmark = pytest.mark.real_model


def test_upload_and_generate_on_the_real_model(make_client, each_real_base):
    real_base = each_real_base
    client = make_client(real_base)
    health = client.get("/health").json()
    assert health["base_model"] == real_base.name and health["quantization"] == "int8"
    prompt = random_soft_prompt(real_base, 10, seed=5)
    adapter_id = upload_adapter(client, prompt, name="real")["id"]
    text_prompt = "Review: a gripping , funny film\nSentiment:"
    response = client.post("/generate", json={"adapter_id": adapter_id, "prompt": text_prompt, "max_new_tokens": 8})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["usage"]["completion_tokens"] >= 1
    ids = real_base.tokenizer(text_prompt).input_ids
    tokens = real_base.tokenizer(body["text"], add_special_tokens=False).input_ids
    check = check_against_reference(real_base, prompt, ids, tokens, 8, INT8_TIE_TOLERANCE)
    assert check.agrees, (body, check)
    # The soft prompt steers the real model (a sentiment prompt's answer is too settled to show it).
    story = {"prompt": "Once upon a time", "max_new_tokens": 8}
    steered = client.post("/generate", json=story | {"adapter_id": adapter_id}).json()["text"]
    assert steered != client.post("/generate", json=story).json()["text"]


def test_a_prefix_tuned_adapter_generates_like_the_reference_on_the_real_model(make_client, each_real_base):
    real_base = each_real_base
    client = make_client(real_base)
    # PEFT's initial prefix (standard normal keys and values), uploaded in its PREFIX_TUNING format.
    prefix = random_prefix_kv(real_base, 6, seed=3).prefix_kv
    files = encode_prefix_adapter(to_flat(prefix), real_base.kv_shape, real_base.fingerprint, real_base.name)
    response = client.post("/adapters", data={"name": "real-prefix"},
                           files={"config": (CONFIG_NAME, files[CONFIG_NAME]), "weights": (WEIGHTS_NAME, files[WEIGHTS_NAME])})
    assert response.status_code == 201, response.text
    story = {"prompt": "Once upon a time", "max_new_tokens": 8}
    body = client.post("/generate", json=story | {"adapter_id": response.json()["id"]}).json()
    ids = real_base.tokenizer(story["prompt"]).input_ids
    tokens = real_base.tokenizer(body["text"], add_special_tokens=False).input_ids
    check = check_against_reference(real_base, SoftPrompt.prefix(prefix), ids, tokens, 8, INT8_TIE_TOLERANCE)
    assert check.agrees, (body, check)
    assert body["text"] != client.post("/generate", json=story).json()["text"]  # the prefix steers


def test_a_chat_reply_with_an_adapter_is_the_reference_decode_of_the_rendered_chat(make_client, each_real_base):
    """Gemma 3 270M has no chat template of its own (the plain one applies), SmolLM2 has ChatML."""
    real_base = each_real_base
    client = make_client(real_base)
    prompt = random_soft_prompt(real_base, 10, seed=5)
    adapter_id = upload_adapter(client, prompt, name="real-chat")["id"]
    messages = [{"role": "system", "content": "You answer briefly."}, {"role": "user", "content": "Name a colour."}]
    request = {"model": adapter_id, "messages": messages, "max_completion_tokens": 8, "temperature": 0}
    response = client.post("/v1/chat/completions", json=request)
    assert response.status_code == 200, response.text
    reply = response.json()["choices"][0]["message"]["content"]
    ids = chat_template.prompt_ids(real_base.tokenizer, messages)
    assert response.json()["usage"]["prompt_tokens"] == len(ids)
    tokens = real_base.tokenizer(reply, add_special_tokens=False).input_ids
    check = check_against_reference(real_base, prompt, ids, tokens, 8, INT8_TIE_TOLERANCE)
    assert check.agrees, (reply, check)
    base_reply = client.post("/v1/chat/completions", json=request | {"model": real_base.name}).json()
    assert base_reply["choices"][0]["message"]["content"] != reply  # the soft prompt steers the chat
