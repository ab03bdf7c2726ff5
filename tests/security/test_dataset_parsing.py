"""Items 4 (datasets) and 15: training uploads that broke the parser get a 422 naming the line and
the problem; lines end at \\n only, are capped in length, and parsing stops at the example cap."""

import json

import pytest

from app import datasets
from app.storage import dataset_key

GOOD_LINE = b'{"input": "fine", "output": "yes"}\n'


def post(client, data: bytes, filename: str = "train.jsonl"):
    return client.post("/train-jobs", files={"file": (filename, data)})


def refused(client, data: bytes, filename: str = "train.jsonl") -> list[dict]:
    response = post(client, data, filename)
    assert response.status_code == 422, response.text
    assert client.get("/train-jobs").json()["total"] == 0  # nothing stored
    return response.json()["detail"]["errors"]


def stored_examples(client, job: dict) -> list[datasets.Example]:
    storage = client.app.state.runtime.storage
    return datasets.from_jsonl(storage.read(dataset_key(job["id"]), "train.jsonl"))


def test_a_line_nested_100k_deep(client):
    errors = refused(client, GOOD_LINE + b"[" * 100_000 + b"]" * 100_000 + b"\n")
    assert errors == [{"line": 2, "message": "JSON nested too deeply"}]


def test_a_5000_digit_integer(client):
    line = b'{"input": "a", "output": "b", "id": ' + b"7" * 5000 + b"}\n"
    errors = refused(client, GOOD_LINE + line)
    assert errors[0]["line"] == 2 and "number with more than 4300 digits" in errors[0]["message"]


@pytest.mark.parametrize("data, line", [
    (b"input,output\nfine,yes\n" + b'"' + b"x" * 131_073 + b'",no\n', 3),
    (b"input," + b"x" * 131_073 + b"\nfine,yes\n", 1),  # in the header
])
def test_a_csv_field_over_the_csv_modules_limit(client, data, line):
    errors = refused(client, data, "train.csv")
    assert errors == [{"line": line, "message": "not valid CSV (field larger than field limit (131072))"}]


@pytest.mark.parametrize("separator", ["\u2028", "\u2029", "\u0085"])
def test_unicode_line_separators_inside_strings_are_kept(client, separator):
    text = f"one{separator}two"
    lines = [json.dumps({"input": text, "output": "yes"}, ensure_ascii=False), json.dumps({"input": "b", "output": "no"})]
    response = post(client, "\n".join(lines).encode())
    assert response.status_code == 202, response.text
    assert response.json()["train_examples"] == 2
    assert stored_examples(client, response.json())[0].input == text


def test_line_numbers_count_newlines_only(client):
    data = json.dumps({"input": "a\u2028b", "output": "c"}, ensure_ascii=False).encode() + b"\r\n" + b"oops\r\n"
    assert refused(client, data) == [{"line": 2, "message": "not valid JSON (Expecting value)"}]


def test_crlf_files_are_accepted(client):
    response = post(client, GOOD_LINE.replace(b"\n", b"\r\n") * 3)
    assert response.status_code == 202 and response.json()["train_examples"] == 3


def test_a_line_over_the_length_cap_is_refused_unparsed(client):
    long_input = "x" * datasets.MAX_LINE_CHARS
    line = json.dumps({"input": long_input, "output": "yes"}).encode() + b"\n"
    errors = refused(client, GOOD_LINE + line + GOOD_LINE)
    assert errors == [{"line": 2, "message": f"line is longer than {datasets.MAX_LINE_CHARS} characters"}]


def test_a_line_at_the_length_cap_is_accepted(client):
    padding = datasets.MAX_LINE_CHARS - len('{"input": "", "output": "yes"}')
    line = json.dumps({"input": "x" * padding, "output": "yes"}).encode()
    assert len(line) == datasets.MAX_LINE_CHARS
    response = post(client, line + b"\n")
    assert response.status_code == 202, response.text


def test_parsing_stops_at_the_example_cap(make_client, tiny_base):
    client = make_client(tiny_base, max_train_examples=3)
    # Line 4 is one example too many: the broken lines after it are never read.
    errors = refused(client, b"not json\n" + GOOD_LINE * 4 + b"broken\n" * 100)
    assert errors == [{"line": 1, "message": "not valid JSON (Expecting value)"},
                      {"line": 5, "message": "too many examples, the limit is 3; stopped reading here"}]


def test_a_lone_surrogate_in_a_jsonl_string(client):
    # json reads "\ud800" escapes as lone surrogates, which cannot be stored as UTF-8.
    errors = refused(client, GOOD_LINE + b'{"input": "a \\ud800 b", "output": "yes"}\n')
    assert errors == [{"line": 2, "message": "field 'input' is not valid Unicode: it holds an unpaired surrogate"}]


def counting_records(monkeypatch) -> list[int]:
    """Count the records the parser reads (steps, not seconds)."""
    records, read = datasets._records, []

    def counted(*args):
        for record in records(*args):
            read.append(record[0])
            yield record

    monkeypatch.setattr(datasets, "_records", counted)
    return read


@pytest.mark.parametrize("filename, data", [("t.csv", b"input,output\n" + b",\n" * 200_000),
                                            ("t.jsonl", b"{}\n" * 200_000)])
def test_a_file_of_bad_rows_is_read_only_to_its_twentieth(monkeypatch, filename, data):
    """Issue 21, finding 5: 24 million empty CSV rows took 110 s to refuse, all of them parsed."""
    read = counting_records(monkeypatch)
    with pytest.raises(datasets.DatasetError) as refused:
        datasets.parse_dataset(data, "file", filename, max_examples=10)
    assert len(refused.value.errors) == 20 and len(read) == 20
    assert refused.value.stopped == "stopped reading at the 20th problem"


@pytest.mark.parametrize("filename, data", [("t.csv", b"input,output\n" + b"\n" * 100_000),
                                            ("t.jsonl", b"\n" * 100_000)])
def test_a_file_of_blank_lines_stops_at_its_time_budget(monkeypatch, filename, data):
    read = counting_records(monkeypatch)
    with pytest.raises(datasets.DatasetError) as refused:
        datasets.parse_dataset(data, "file", filename, max_examples=10, time_budget_s=0)
    assert len(read) == 4096  # the budget is looked at every 4,096 lines: the first look stops it
    [(_, message)] = refused.value.errors
    assert message == "reading the file took over 0 s; stopped reading here"
