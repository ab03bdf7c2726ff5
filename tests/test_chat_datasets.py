"""Chat datasets ({"messages": [...]} lines, OpenAI's fine-tuning format): validated with line
numbers, one format a file, stored normalised; /train-jobs takes them."""

import json

import pytest

from app import datasets
from app.storage import dataset_key
from tests.api.test_train_jobs_api import GOOD, stored


def chat(*turns, **extra) -> dict:
    """A chat of (role, content) turns, or of message dicts as they are."""
    return {"messages": [t if isinstance(t, dict) else {"role": t[0], "content": t[1]} for t in turns]} | extra


def jsonl(*records) -> bytes:
    return b"".join(json.dumps(r).encode() + b"\n" for r in records)


GOOD_CHAT = chat(("system", "Be brief."), ("user", "a gripping film"), ("assistant", "positive"))


def normalise(data: bytes) -> bytes:
    return datasets.normalised(data, "file", "train.jsonl", 100, 10)


def problems(data: bytes) -> list[tuple[int, str]]:
    with pytest.raises(datasets.DatasetError) as raised:
        normalise(data)
    return raised.value.errors


def test_chats_are_stored_normalised_and_read_back():
    parts = chat({"role": "developer", "content": [{"type": "text", "text": "Be"}, {"type": "text", "text": "brief."}]},
                 ("user", "hi"), {"role": "assistant", "content": "hello", "weight": 0}, ("user", "a film"),
                 {"role": "assistant", "content": "positive", "weight": 1})
    data = normalise(jsonl(GOOD_CHAT, parts))
    assert data.split(b"\n")[1] == json.dumps(chat(
        ("system", "Be\nbrief."), ("user", "hi"), {"role": "assistant", "content": "hello", "weight": 0},
        ("user", "a film"), ("assistant", "positive"))).encode()
    assert datasets.dataset_format(data) == "chat"
    assert datasets.dataset_format(jsonl({"input": "a", "output": "b"})) == "completion"
    first, second = datasets.from_jsonl(data)
    assert [m.role for m in first.messages] == ["system", "user", "assistant"] and first.output == "positive"
    assert second.trained == [False, False, False, False, True] and second.output == "positive"
    assert datasets.to_jsonl([first, second]) == data


@pytest.mark.parametrize("record, message", [
    (chat(("user", "hi")), "a chat example needs an assistant message to learn from"),
    (chat(("user", "hi"), {"role": "assistant", "content": "x", "weight": 0}), "a chat example needs an assistant"),
    (chat(("tool", "42"), ("assistant", "x")), "message 1: role 'tool' is not supported (system, developer, user, assistant)"),
    (chat(("user", "hi"), {"role": "assistant", "content": None, "tool_calls": []}),
     "message 2: field 'tool_calls' is not supported"),
    (chat({"role": "user"}, ("assistant", "x")), "message 1: missing field 'content'"),
    (chat(("user", 5), ("assistant", "x")), "message 1 content must be a string"),
    (chat(("user", [{"type": "image_url", "image_url": {}}]), ("assistant", "x")), "message 1 content: only text parts"),
    (chat({"role": "user", "content": "hi", "weight": 1}, ("assistant", "x")),
     "message 1: weight is for assistant messages only"),
    (chat(("user", "hi"), {"role": "assistant", "content": "x", "weight": 2}), "message 2: weight must be 0 or 1"),
    (chat(("user", "hi"), {"role": "assistant", "content": "x", "weight": True}), "message 2: weight must be 0 or 1"),
    (chat(("user", "hi"), ("assistant", "  ")), "message 2: an assistant message to learn must have non-empty content"),
    (chat(("user", "\ud800"), ("assistant", "x")), "message 1 content is not valid Unicode"),
    ({"messages": []}, "field 'messages' must be a non-empty list"),
    ({"messages": "hi"}, "field 'messages' must be a non-empty list"),
    (chat(("user", "hi"), ("assistant", "x"), tools=[]), "field 'tools' is not supported in a chat example"),
    ({"input": "a", "output": "b"}, "an input/output example in a file of chat examples (from line 1)"),
])
def test_a_bad_chat_line_is_named_by_its_number(record, message):
    [(line, problem)] = problems(jsonl(GOOD_CHAT, record, GOOD_CHAT))
    assert line == 2 and problem.startswith(message), problem


def test_a_file_of_input_output_examples_refuses_chats():
    assert problems(jsonl({"input": "a", "output": "b"}, GOOD_CHAT)) == [
        (2, "a chat example in a file of input/output examples (from line 1): a file holds one format")]


def test_train_jobs_takes_a_chat_dataset_and_stores_it_normalised(make_client, tiny_base):
    client = make_client(tiny_base)
    response = client.post("/train-jobs", files={"file": ("chats.jsonl", jsonl(GOOD_CHAT, GOOD_CHAT))})
    assert response.status_code == 202, response.text
    assert response.json()["train_examples"] == 2
    data = client.app.state.runtime.storage.read(dataset_key(response.json()["id"]), "train.jsonl")
    assert datasets.from_jsonl(data) == [datasets.from_jsonl(jsonl(GOOD_CHAT))[0]] * 2


def test_train_jobs_refuses_a_validation_file_in_the_other_format(make_client, tiny_base):
    client = make_client(tiny_base)
    response = client.post("/train-jobs", files={"file": ("chats.jsonl", jsonl(GOOD_CHAT)), "validation_file": ("v.jsonl", GOOD)})
    assert response.status_code == 422
    [error] = response.json()["detail"]
    assert error["loc"] == ["body", "validation_file"]
    assert error["msg"] == "is completion data and file is chat data: use one format"
    assert stored(client) == (0, [])


def test_a_bad_chat_upload_gets_422_naming_the_line(make_client, tiny_base):
    client = make_client(tiny_base)
    response = client.post("/train-jobs", files={"file": ("chats.jsonl", jsonl(GOOD_CHAT, chat(("user", "hi"))))})
    assert response.status_code == 422
    assert response.json()["detail"]["errors"] == [
        {"line": 2, "message": "a chat example needs an assistant message to learn from (one without weight 0)"}]
