"""Item 2: NaN, Infinity and lone surrogates in JSON bodies get a 422 naming the field, never a 500.

Python's json accepts the NaN and Infinity literals and "\\ud800" escapes; a validation error that
echoes such input must still be encodable as strict JSON.
"""

import pytest

from tests.security.conftest import strict_json

HEADERS = {"content-type": "application/json"}
SURROGATE = '"\\ud800"'  # a lone surrogate escape, as raw JSON text


def post_raw(client, path: str, members: str):
    """POST a JSON object written by hand, so it can hold NaN, Infinity and surrogate escapes."""
    return client.post(path, content="{" + members + "}", headers=HEADERS)


@pytest.mark.parametrize(
    "members, field",
    [
        ('"prompt": "hi", "temperature": NaN', "temperature"),
        ('"prompt": "hi", "temperature": Infinity', "temperature"),
        ('"prompt": "hi", "temperature": 1e999', "temperature"),  # overflows to inf
        ('"prompt": "hi", "top_p": NaN', "top_p"),
        ('"prompt": "hi", "top_p": -Infinity', "top_p"),
        (f'"prompt": {SURROGATE}', "prompt"),
        ('"prompt": "ok \\udfff then"', "prompt"),
        (f'"prompt": "hi", "stop": ["\\n", {SURROGATE}]', "stop"),
        (f'"prompt": "hi", "adapter_id": {SURROGATE}', "adapter_id"),
        # Fields without a finite-number rule: the error handler itself must cope with the echo.
        ('"prompt": "hi", "max_new_tokens": NaN', "max_new_tokens"),
        ('"prompt": "hi", "seed": Infinity', "seed"),
        (f'"prompt": "hi", "stream": {SURROGATE}', "stream"),
    ],
)
def test_generate_names_the_field(client, members, field):
    response = post_raw(client, "/generate", members)
    assert response.status_code == 422
    errors = strict_json(response)["detail"]
    assert field in [error["loc"][1] for error in errors]


def test_a_lone_surrogate_in_a_key_is_a_422(client):
    response = post_raw(client, "/generate", f'"prompt": "hi", {SURROGATE}: 1')
    assert response.status_code == 422
    assert strict_json(response)["detail"][0]["input"] == "\ufffd"  # echoed, replaced


@pytest.mark.parametrize(
    "members, param, message",
    [
        ('"temperature": NaN', "temperature", "finite number"),
        ('"temperature": Infinity', "temperature", "finite number"),
        ('"top_p": NaN', "top_p", "finite number"),
        ('"presence_penalty": NaN', "presence_penalty", "finite number"),
        ('"logit_bias": {"5": Infinity}', "logit_bias", "finite number"),
        (f'"stop": {SURROGATE}', "stop", "surrogate"),
        (f'"logit_bias": {{{SURROGATE}: NaN}}', "logit_bias", "finite number"),  # the key is in the location
    ],
)
def test_completions_name_the_param_in_openais_shape(client, tiny_base, members, param, message):
    response = post_raw(client, "/v1/completions", f'"model": "{tiny_base.name}", "prompt": "hi", {members}')
    assert response.status_code == 422
    error = strict_json(response)["error"]
    assert error["param"] == param and message in error["message"]
    assert error["type"] == "invalid_request_error"


@pytest.mark.parametrize("prompt", [SURROGATE, f'["fine", {SURROGATE}]'])
def test_a_lone_surrogate_in_a_completion_prompt_is_refused(client, tiny_base, prompt):
    response = post_raw(client, "/v1/completions", f'"model": "{tiny_base.name}", "prompt": {prompt}')
    assert response.status_code == 422
    error = strict_json(response)["error"]
    assert error["param"] == "prompt" and "surrogate" in error["message"]


def test_a_lone_surrogate_as_the_model_is_refused(client):
    response = post_raw(client, "/v1/completions", f'"model": {SURROGATE}, "prompt": "hi"')
    assert response.status_code == 422
    error = strict_json(response)["error"]
    assert error["param"] == "model" and "surrogate" in error["message"]


@pytest.mark.parametrize("path", ["/generate", "/v1/completions"])
def test_a_body_that_is_not_utf8_json_is_a_422(client, path):
    # Not declared as JSON, so FastAPI echoes the raw bytes.
    response = client.post(path, content=b"\xff\xfe{", headers={"content-type": "text/plain"})
    assert response.status_code == 422
    assert "valid dictionary" in response.text and strict_json(response)


def test_the_messages_say_what_is_wrong(client):
    errors = strict_json(post_raw(client, "/generate", '"prompt": "hi", "temperature": NaN'))["detail"]
    assert errors[0]["msg"] == "Input should be a finite number"
    errors = strict_json(post_raw(client, "/generate", f'"prompt": {SURROGATE}'))["detail"]
    assert "unpaired surrogate" in errors[0]["msg"]


def test_valid_astral_characters_still_generate(client):
    # A correctly paired surrogate escape is one character (an emoji), not an error.
    response = post_raw(client, "/generate", '"prompt": "so good \\ud83d\\ude00", "max_new_tokens": 2')
    assert response.status_code == 200, response.text


@pytest.mark.parametrize("members, field", [
    ('"max_new_tokens": "5"', "max_new_tokens"),
    ('"max_new_tokens": true', "max_new_tokens"),
    ('"max_new_tokens": 5.0', "max_new_tokens"),
    ('"stream": "yes"', "stream"),
    ('"stream": 1', "stream"),
    ('"temperature": "0"', "temperature"),
    ('"seed": 9223372036854775808', "seed"),  # past int64
    ('"stop": 7', "stop"),
])
def test_generate_takes_json_types_as_written(client, members, field):
    """Issue 21, finding 7: strings and booleans were taken as numbers, "yes" as true."""
    response = post_raw(client, "/generate", f'"prompt": "hi", {members}')
    assert response.status_code == 422, response.text
    assert field in [error["loc"][1] for error in strict_json(response)["detail"]]


@pytest.mark.parametrize("members, param", [
    ('"n": 1.0', "n"), ('"n": true', "n"), ('"max_tokens": "3"', "max_tokens"), ('"stream": "yes"', "stream"),
    ('"stream_options": {"include_usage": "yes"}', "stream_options"), ('"seed": 9223372036854775808', "seed"),
])
def test_completions_take_json_types_as_written(client, tiny_base, members, param):
    response = post_raw(client, "/v1/completions", f'"model": "{tiny_base.name}", "prompt": "hi", {members}')
    assert response.status_code == 422, response.text
    assert strict_json(response)["error"]["param"] == param


def test_the_largest_seed_and_whole_numbers_as_floats_where_a_float_is_meant_are_accepted(client):
    body = '"prompt": "hi", "max_new_tokens": 2, "temperature": 1, "top_p": 1, "seed": 9223372036854775807'
    assert post_raw(client, "/generate", body).status_code == 200


@pytest.mark.parametrize("path", ["/adapters", "/train-jobs", "/adapters/abc"])
def test_a_method_the_path_does_not_take_is_405_naming_every_method_it_does(client, path):
    response = client.options(path)
    assert response.status_code == 405
    expected = {"/adapters": "GET, POST", "/train-jobs": "GET, POST", "/adapters/abc": "DELETE, GET"}[path]
    assert response.headers["allow"] == expected
