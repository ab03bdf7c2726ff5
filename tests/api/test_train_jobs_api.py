"""POST /train-jobs validation and the job routes (pause, resume, checkpoints too), through the real app."""

import json
import threading
import time

import pytest
from sqlalchemy import func, select

from app import jobs, storage
from app.models import JobEvent
from tests.conftest import DATASETS
from worker.job_runner import run_job

GOOD = b"".join(json.dumps({"input": f"text {i}", "output": "yes" if i % 2 else "no"}).encode() + b"\n" for i in range(10))


@pytest.fixture
def client(make_client, tiny_base):
    return make_client(tiny_base)


def stored(client):
    keys = client.app.state.runtime.storage.keys(storage.DATASETS)
    return client.get("/train-jobs").json()["total"], sorted(key.removeprefix(f"{storage.DATASETS}/") for key in keys)


def post(client, data=GOOD, filename="train.jsonl", **fields):
    return client.post("/train-jobs", files={"file": (filename, data)}, data={k: str(v) for k, v in fields.items()})


def test_valid_upload_queues_a_job(client):
    response = post(client, name="yes-no", max_steps=5, template="Q: {input}\nA:")
    assert response.status_code == 202, response.text
    job = response.json()
    assert job["status"] == "queued" and job["name"] == "yes-no" and job["train_examples"] == 10
    assert job["params"]["template"] == "Q: {input}\nA:" and job["params"]["max_steps"] == 5
    assert job["progress"] == {"step": 0, "total_steps": 0, "epoch": 0.0} and job["adapter_id"] is None
    assert client.get(f"/train-jobs/{job['id']}").json()["id"] == job["id"]
    assert [e["data"]["message"] for e in client.get(f"/train-jobs/{job['id']}/events").json()] == ["queued"]
    assert stored(client) == (1, [job["id"]])


def test_a_prefix_tuning_job_keeps_its_method_and_that_methods_learning_rate(client):
    response = post(client, method="prefix_tuning", prefix_projection="true")
    assert response.status_code == 202, response.text
    params = response.json()["params"]
    assert (params["method"], params["prefix_projection"], params["learning_rate"]) == ("prefix_tuning", True, 0.01)
    assert post(client).json()["params"]["learning_rate"] == 0.3  # prompt tuning's, when none is given


def test_the_learning_rate_schedule_is_constant_unless_asked_linear(client):
    assert post(client).json()["params"]["lr_schedule"] == "constant"
    assert post(client, lr_schedule="linear").json()["params"]["lr_schedule"] == "linear"


def test_csv_with_aliases_is_accepted(client):
    csv = b'prompt,completion\n"great, really",positive\nawful,negative\n'
    response = post(client, data=csv, filename="data.csv")
    assert response.status_code == 202, response.text
    assert response.json()["train_examples"] == 2


def test_cancel_a_queued_job_at_once_then_409(client):
    job_id = post(client).json()["id"]
    response = client.post(f"/train-jobs/{job_id}/cancel")
    assert response.status_code == 202 and response.json()["status"] == "cancelled"
    assert client.post(f"/train-jobs/{job_id}/cancel").status_code == 409
    assert client.post("/train-jobs/nope/cancel").status_code == 404


@pytest.mark.parametrize(
    "data, filename, expected_lines, expected_text",
    [
        (b"not json\n", "train.jsonl", [1], "not valid JSON"),
        (GOOD + b'{"input": "x"}\n' + b'{"output": "y"}\n', "train.jsonl", [11, 12], "missing field"),
        (b'{"input": "x", "output": "  "}\n', "train.jsonl", [1], "must be a non-empty string"),
        (b'["a", "b"]\n', "train.jsonl", [1], "expected a JSON object"),
        (b"", "train.jsonl", [0], "file has no examples"),
        (b"\xff\xfe bad bytes", "train.jsonl", [0], "not UTF-8"),
        (b"text,label\nhi,x\n", "train.csv", [1], "CSV header must have columns input and output"),
    ],
)
def test_bad_datasets_get_422_with_line_numbers_and_store_nothing(client, data, filename, expected_lines, expected_text):
    response = post(client, data=data, filename=filename)
    assert response.status_code == 422, response.text
    detail = response.json()["detail"]
    assert detail["field"] == "file" and [e["line"] for e in detail["errors"]] == expected_lines
    assert expected_text in detail["message"]
    assert stored(client) == (0, [])


def test_reading_stops_at_the_twentieth_bad_line(client):
    response = post(client, data=b"nope\n" * 50)
    detail = response.json()["detail"]
    assert detail["error_count"] == 20 and [e["line"] for e in detail["errors"]] == list(range(1, 21))
    assert detail["stopped"] == "stopped reading at the 20th problem" and "(stopped reading" in detail["message"]


def test_bad_validation_file_is_named(client):
    response = client.post("/train-jobs", files={"file": ("t.jsonl", GOOD), "validation_file": ("v.jsonl", b"{oops\n")})
    assert response.status_code == 422 and response.json()["detail"]["field"] == "validation_file"
    assert stored(client) == (0, [])


@pytest.mark.parametrize(
    "fields, field",
    [
        ({"num_virtual_tokens": 0}, "num_virtual_tokens"),
        ({"learning_rate": -1}, "learning_rate"),
        ({"init": "zeros"}, "init"),
        ({"init": "text"}, "init_text"),
        ({"max_steps": 10, "epochs": 2}, "epochs"),
        ({"template": "no placeholder"}, "template"),
        ({"batch_size": "many"}, "batch_size"),
        ({"max_length": 4}, "max_length"),
        ({"method": "lora"}, "method"),
        ({"lr_schedule": "cosine"}, "lr_schedule"),
        ({"prefix_projection": "true"}, "prefix_projection"),  # prompt tuning has no prefix to project
        ({"eval_every": 10**30}, "eval_every"),
        ({"max_steps": 10, "eval_every": 11}, "eval_every"),
        ({"seed": 2**31}, "seed"),
    ],
)
def test_bad_parameters_get_422_naming_the_field(client, fields, field):
    response = post(client, **fields)
    assert response.status_code == 422
    assert field in [str(p) for error in response.json()["detail"] for p in error["loc"]]
    assert stored(client) == (0, [])


def test_too_many_examples_and_oversize_files(make_client, tiny_base):
    client = make_client(tiny_base, max_train_examples=5, max_dataset_bytes=2048)
    assert "the limit is 5" in post(client).json()["detail"]["message"]
    big = (DATASETS / "sst2" / "train.jsonl").read_bytes()[:3000]  # over the 2048-byte file cap
    assert post(client, data=big).status_code == 413
    huge = b"x" * 100_000  # over the whole-body cap (2 files + 64 kB): refused before parsing
    response = post(client, data=huge)
    assert response.status_code == 413 and "request body is larger" in response.json()["detail"]
    assert stored(client) == (0, [])


def test_unknown_job_is_404(client):
    assert client.get("/train-jobs/nope").status_code == 404
    assert client.get("/train-jobs/nope/events").status_code == 404


def test_broker_down_gives_503_and_stores_nothing(make_client, tiny_base):
    client = make_client(tiny_base, redis_url="redis://127.0.0.1:1/0")  # nothing listens there: as configured
    response = post(client)
    assert response.status_code == 503 and "job queue unavailable" in response.json()["detail"]
    assert response.headers["retry-after"] == "5"
    assert stored(client) == (0, [])
    with client.app.state.runtime.sessions() as session:  # not even the job's "queued" event
        assert session.scalar(select(func.count()).select_from(JobEvent)) == 0


def test_pause_and_resume_a_queued_job_and_the_409s(client):
    job_id = post(client).json()["id"]
    response = client.post(f"/train-jobs/{job_id}/pause")
    assert response.status_code == 202 and response.json()["status"] == "paused"
    assert client.get("/train-jobs", params={"status": "paused"}).json()["total"] == 1
    again = client.post(f"/train-jobs/{job_id}/pause")
    assert again.status_code == 409 and "is paused: only a queued or running job can be paused" in again.json()["detail"]
    response = client.post(f"/train-jobs/{job_id}/resume")
    assert response.status_code == 202 and response.json()["status"] == "queued"
    with client.app.state.runtime.sessions() as session:  # its message went to the broker
        assert jobs.get_job(session, job_id).sent_at is not None
    again = client.post(f"/train-jobs/{job_id}/resume")
    assert again.status_code == 409 and "is queued: only a paused job can be resumed" in again.json()["detail"]
    messages = [e["data"]["message"] for e in client.get(f"/train-jobs/{job_id}/events").json()]
    assert messages == ["queued", "paused while queued", "resumed"]
    client.post(f"/train-jobs/{job_id}/pause")
    assert client.post(f"/train-jobs/{job_id}/cancel").json()["status"] == "cancelled"  # cancelled while paused
    for action in ("pause", "resume"):
        assert client.post(f"/train-jobs/{job_id}/{action}").status_code == 409
        assert client.post(f"/train-jobs/nope/{action}").status_code == 404
    assert client.get("/train-jobs/nope/checkpoints").status_code == 404


def test_pausing_a_running_job_asks_its_run_to_stop(client):
    job_id = post(client).json()["id"]
    with client.app.state.runtime.sessions() as session:
        assert jobs.claim(session, job_id, "a-worker")
    response = client.post(f"/train-jobs/{job_id}/pause")
    assert response.status_code == 202
    assert (response.json()["status"], response.json()["pause_requested"]) == ("running", True)
    assert client.get(f"/admin/jobs/{job_id}").status_code == 200 and "pausing" in client.get(f"/admin/jobs/{job_id}").text


def test_a_checkpoint_serves_while_its_job_runs(make_client, tiny_base):
    client = make_client(tiny_base, heartbeat_interval_s=0.2)
    runtime = client.app.state.runtime
    job_id = post(client, max_steps=100_000, eval_every=1, early_stopping_patience=1000).json()["id"]
    outcome = []
    run = threading.Thread(target=lambda: outcome.append(run_job(
        job_id, settings=runtime.settings, sessions=runtime.sessions, base=tiny_base, device=runtime.engine)))
    run.start()
    try:
        deadline = time.monotonic() + 120  # generous: the test machine's cores are shared
        while not (checkpoints := client.get(f"/train-jobs/{job_id}/checkpoints").json()) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert checkpoints, f"no checkpoint within 120 s: {client.get(f'/train-jobs/{job_id}').json()}"
        first = checkpoints[-1]
        assert first["id"] == f"ftckpt-{first['adapter_id']}" and first["job_id"] == job_id
        assert first["metrics"]["step"] == first["step"] and "eval_accuracy" in first["metrics"]
        generated = client.post("/generate", json={"adapter_id": first["adapter_id"], "prompt": "text 3",
                                                   "max_new_tokens": 2})
        assert generated.status_code == 200, generated.text
        assert client.get(f"/train-jobs/{job_id}").json()["status"] == "running"  # served while the job runs
    finally:
        client.post(f"/train-jobs/{job_id}/cancel")
        run.join(timeout=120)
    assert outcome == ["cancelled"], (outcome, client.get(f"/train-jobs/{job_id}/events").json()[-5:])
    # The ended job keeps its last three checkpoints and the best (the first may be pruned): those serve.
    kept = client.get(f"/train-jobs/{job_id}/checkpoints").json()
    assert 1 <= len(kept) <= 4
    assert client.post("/generate", json={"adapter_id": kept[0]["adapter_id"], "prompt": "x",
                                          "max_new_tokens": 1}).status_code == 200
