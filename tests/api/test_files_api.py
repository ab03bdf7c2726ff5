"""OpenAI's Files API (/v1/files) through the real app: upload, validation, list, content, delete, auth."""

import json

import pytest

from app import auth, storage
from app.job_status import JobStatus
from app.models import TrainJob, UploadedFile
from tests.conftest import DATASETS

GOOD = b"".join(json.dumps({"prompt": f"text {i}", "completion": "yes" if i % 2 else "no"}).encode() + b"\n"
                for i in range(10))


@pytest.fixture
def client(make_client, tiny_base):
    return make_client(tiny_base)


def upload(client, data=GOOD, filename="train.jsonl", purpose="fine-tune", **kwargs):
    return client.post("/v1/files", files={"file": (filename, data)}, data={"purpose": purpose}, **kwargs)


def stored(client):
    """The files' rows and the keys of their data in shared storage."""
    runtime = client.app.state.runtime
    with runtime.sessions() as session:
        rows = sorted(row.id for row in session.query(UploadedFile))
    return rows, sorted(key.removeprefix(f"{storage.FILES}/") for key in runtime.storage.keys(storage.FILES))


def openai_error(response, status, param=None):
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error" and error["param"] == param
    return error


def test_upload_then_list_retrieve_content_and_delete(client):
    response = upload(client)
    assert response.status_code == 200, response.text
    created = response.json()
    assert created["id"].startswith("file-") and created["object"] == "file" and created["purpose"] == "fine-tune"
    assert (created["filename"], created["status"]) == ("train.jsonl", "processed") and created["created_at"] > 0
    content = client.get(f"/v1/files/{created['id']}/content")
    assert content.status_code == 200 and content.headers["content-type"] == "application/octet-stream"
    # Stored normalised, as /train-jobs stores datasets: the aliases become input and output.
    lines = [json.loads(line) for line in content.content.decode().splitlines()]
    assert lines[1] == {"input": "text 1", "output": "yes"} and len(lines) == 10
    assert created["bytes"] == len(content.content)
    assert client.get(f"/v1/files/{created['id']}").json() == created
    assert client.get("/v1/files").json() == {"object": "list", "data": [created], "has_more": False}
    assert stored(client) == ([created["id"]], [created["id"]])
    with client.app.state.runtime.sessions() as session:
        row = session.get(UploadedFile, created["id"])
        assert (row.examples, row.format) == (10, "completion")
    deleted = client.delete(f"/v1/files/{created['id']}")
    assert deleted.status_code == 200 and deleted.json() == {"id": created["id"], "object": "file", "deleted": True}
    assert stored(client) == ([], [])
    for response in (client.get(f"/v1/files/{created['id']}"), client.get(f"/v1/files/{created['id']}/content"),
                     client.delete(f"/v1/files/{created['id']}")):
        assert openai_error(response, 404, "file_id")["code"] == "file_not_found"


def test_csv_is_accepted_as_train_jobs_accepts_it(client):
    response = upload(client, b'prompt,completion\n"great, really",positive\nawful,negative\n', "data.csv")
    assert response.status_code == 200, response.text
    assert response.json()["filename"] == "data.csv"


def test_chat_lines_are_marked_as_chat(client, monkeypatch):
    """A dataset normalised to chat lines is a chat file (app.datasets reads them once chat datasets land)."""
    from app import datasets

    async def chat_lines(*args):
        return b'{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}\n'

    monkeypatch.setattr(datasets, "normalise_elsewhere", chat_lines)
    file_id = upload(client).json()["id"]
    with client.app.state.runtime.sessions() as session:
        assert session.get(UploadedFile, file_id).format == "chat"


@pytest.mark.parametrize(
    "data, expected",
    [
        (GOOD + b"not json\n", "line 11: not valid JSON"),
        (b'{"input": "x"}\n', "line 1: missing field 'output'"),
        (b"", "file has no examples"),
    ],
)
def test_a_bad_file_is_400_naming_its_line_and_nothing_is_stored(client, data, expected):
    error = openai_error(upload(client, data), 400, "file")
    assert expected in error["message"] and error["code"] == "invalid_file"
    assert stored(client) == ([], [])


def test_the_purpose_must_be_fine_tune_and_the_file_given(client):
    assert "purpose" in openai_error(upload(client, purpose="assistants"), 422, "purpose")["message"]
    no_file = client.post("/v1/files", files={"other": ("x.jsonl", GOOD)}, data={"purpose": "fine-tune"})
    openai_error(no_file, 422, "file")
    assert stored(client) == ([], [])


def test_the_dataset_caps_of_train_jobs_apply(make_client, tiny_base):
    client = make_client(tiny_base, max_train_examples=5, max_dataset_bytes=2048)
    assert "the limit is 5" in openai_error(upload(client), 400, "file")["message"]
    big = (DATASETS / "sst2" / "train.jsonl").read_bytes()[:3000]  # over the 2048-byte file cap
    assert upload(client, big).status_code == 413
    assert stored(client) == ([], [])


def test_list_pages_with_after_and_order(client):
    ids = [upload(client).json()["id"] for _ in range(3)]
    newest_first = [f["id"] for f in client.get("/v1/files").json()["data"]]
    assert sorted(newest_first) == sorted(ids) and newest_first[::-1] == [f["id"] for f in client.get(
        "/v1/files", params={"order": "asc"}).json()["data"]]
    page = client.get("/v1/files", params={"limit": 2}).json()
    assert [f["id"] for f in page["data"]] == newest_first[:2] and page["has_more"]
    rest = client.get("/v1/files", params={"limit": 2, "after": newest_first[1]}).json()
    assert [f["id"] for f in rest["data"]] == newest_first[2:] and not rest["has_more"]
    assert client.get("/v1/files", params={"purpose": "batch"}).json()["data"] == []
    openai_error(client.get("/v1/files", params={"after": "file-nope"}), 404, "after")


def test_a_file_a_job_uses_is_kept_until_the_job_ends(client):
    file_id = upload(client).json()["id"]
    job = client.post("/v1/fine_tuning/jobs", json={"model": client.app.state.runtime.base.name,
                                                     "training_file": file_id})
    assert job.status_code == 200, job.text
    error = openai_error(client.delete(f"/v1/files/{file_id}"), 409, "file_id")
    assert job.json()["id"] in error["message"] and error["code"] == "file_in_use"
    runtime = client.app.state.runtime
    with runtime.sessions() as session:  # a paused job will go on: it still needs the file
        session.get(TrainJob, job.json()["id"]).status = JobStatus.PAUSED
        session.commit()
    openai_error(client.delete(f"/v1/files/{file_id}"), 409, "file_id")
    with runtime.sessions() as session:
        session.get(TrainJob, job.json()["id"]).status = JobStatus.CANCELLED
        session.commit()
    assert client.delete(f"/v1/files/{file_id}").status_code == 200


def test_an_inference_key_reads_descriptions_but_not_content_and_changes_nothing(client):
    with client.app.state.runtime.sessions() as session:
        _, admin_key = auth.create_key(session, "admin", "ops")
        _, inference_key = auth.create_key(session, "inference", "app")
    admin, inference = {"Authorization": f"Bearer {admin_key}"}, {"Authorization": f"Bearer {inference_key}"}
    file_id = upload(client, headers=admin).json()["id"]
    assert client.get("/v1/files", headers=inference).status_code == 200
    assert client.get(f"/v1/files/{file_id}", headers=inference).status_code == 200
    openai_error(client.get(f"/v1/files/{file_id}/content", headers=inference), 403)
    openai_error(client.delete(f"/v1/files/{file_id}", headers=inference), 403)
    openai_error(upload(client, headers=inference), 403)
    openai_error(client.get("/v1/files"), 401)
    assert stored(client) == ([file_id], [file_id])
