"""Hostile adapter_config.json files: each gets a 422 naming the problem, and nothing is stored."""

import json

import pytest

from tests.conftest import adapter_file_bytes, random_soft_prompt


@pytest.fixture
def client(make_client, tiny_base):
    return make_client(tiny_base)


def valid_config(tiny_base) -> tuple[dict, bytes]:
    config, weights = adapter_file_bytes(random_soft_prompt(tiny_base, 3, seed=1))
    return json.loads(config), weights


@pytest.mark.parametrize(
    "case, expected",
    [
        ("nested_100k_deep", "adapter_config.json: JSON nested too deeply"),
        ("5000_digit_integer", "adapter_config.json: not valid UTF-8 JSON (an integer has 5000 digits; at most 100 allowed)"),
        ("5000_digit_negative_integer", "adapter_config.json: not valid UTF-8 JSON (an integer has 5000 digits; at most 100"),
    ],
)
def test_hostile_config_json_gets_422_naming_the_problem(client, tiny_base, case, expected):
    config, weights = valid_config(tiny_base)
    if case == "nested_100k_deep":
        text = json.dumps(config)[:-1] + ', "x": ' + "[" * 100_000 + "]" * 100_000 + "}"
    elif case == "5000_digit_integer":
        text = json.dumps(config)[:-1] + ', "x": ' + "9" * 5000 + "}"
    else:
        text = json.dumps(config | {"num_virtual_tokens": "N"}).replace('"N"', "-" + "1" * 5000)
    response = client.post(
        "/adapters", data={"name": "x"},
        files={"config": ("adapter_config.json", text.encode()), "weights": ("adapter_model.safetensors", weights)},
    )
    assert response.status_code == 422, response.text
    assert expected in response.json()["detail"]
    assert client.get("/adapters").json()["total"] == 0


def test_ordinary_integers_still_parse(client, tiny_base):
    config, weights = valid_config(tiny_base)
    text = json.dumps(config | {"x": 10**99, "y": -(10**99)})  # 100 digits: allowed
    response = client.post(
        "/adapters", data={"name": "x"},
        files={"config": ("adapter_config.json", text.encode()), "weights": ("adapter_model.safetensors", weights)},
    )
    assert response.status_code == 201, response.text
