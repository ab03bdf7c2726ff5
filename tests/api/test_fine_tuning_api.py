"""OpenAI's fine-tuning jobs API (/v1/fine_tuning/jobs) through the real app: the job it makes is
the /train-jobs machinery's, OpenAI's fields map onto softserve's, errors are OpenAI-shaped and
name the field, warm starts check the adapter, fine-tuned names serve; and the whole flow with the
official `openai` client against a node that trains."""

import json

import httpx
import openai
import pytest
from sqlalchemy import func, select

from app import auth, jobs, storage
from app.adapter_files import CONFIG_NAME, WEIGHTS_NAME, encode_prefix_adapter
from app.engine.prefix_kv import to_flat
from app.job_status import JobStatus
from app.main import create_app
from app.model_names import adapter_for_model, fine_tuned_model
from app.models import Adapter, JobCheckpoint, JobEvent, TrainJob, utcnow
from tests.api.test_files_api import GOOD, openai_error
from tests.conftest import LiveServer, make_settings, random_prefix_kv, random_soft_prompt, upload_adapter
from tests.worker.test_end_to_end import sst2_slice
from tests.worker.test_node_lifetime import wait_until
from worker.consumer import training_consumer


@pytest.fixture
def client(make_client, tiny_base):
    return make_client(tiny_base)


def upload_file(client, data=GOOD) -> str:
    response = client.post("/v1/files", files={"file": ("train.jsonl", data)}, data={"purpose": "fine-tune"})
    assert response.status_code == 200, response.text
    return response.json()["id"]


def create(client, **body):
    base = client.app.state.runtime.base.name
    body = {"model": base} | body
    if "training_file" not in body:
        body["training_file"] = upload_file(client)
    return client.post("/v1/fine_tuning/jobs", json=body)


def created(client, **body) -> dict:
    response = create(client, **body)
    assert response.status_code == 200, response.text
    return response.json()


def stored_job(client, job_id) -> TrainJob:
    with client.app.state.runtime.sessions() as session:
        return session.get(TrainJob, job_id)


def test_model_names_resolve_to_adapters():
    assert fine_tuned_model("gemma-3-270m", "sst2", "3f9a1c2b7d4e") == "ft:gemma-3-270m:sst2:3f9a1c2b7d4e"
    assert fine_tuned_model("gemma-3-270m", None, "3f9a1c2b7d4e") == "ft:gemma-3-270m:softserve:3f9a1c2b7d4e"
    assert adapter_for_model("gemma-3-270m", "gemma-3-270m") is None
    assert adapter_for_model("ft:gemma-3-270m:sst2:3f9a1c2b7d4e", "gemma-3-270m") == "3f9a1c2b7d4e"
    assert adapter_for_model("ft:gemma-3-270m:sst2:3f9a1c2b7d4e:ckpt-step-40", "gemma-3-270m") == "3f9a1c2b7d4e"
    assert adapter_for_model("3f9a1c2b7d4e", "gemma-3-270m") == "3f9a1c2b7d4e"
    assert adapter_for_model("ft:gemma-3-270m:sst2", "gemma-3-270m") == "ft:gemma-3-270m:sst2"  # no id: unknown


def test_a_job_is_made_from_openai_fields_and_shows_through_train_jobs(client, tiny_base):
    training, validation = upload_file(client), upload_file(client, GOOD[: GOOD.index(b"\n") + 1])
    job = created(client, training_file=training, validation_file=validation, suffix="yes-no", seed=7,
                  metadata={"team": "reviews"},
                  method={"type": "supervised", "supervised": {"hyperparameters": {
                      "n_epochs": 3, "batch_size": 4, "learning_rate_multiplier": 0.5}}},
                  softserve={"num_virtual_tokens": 6, "template": "Q: {input}\nA:", "eval_every": 2})
    assert job["object"] == "fine_tuning.job" and job["status"] == "queued" and job["model"] == tiny_base.name
    assert (job["training_file"], job["validation_file"], job["suffix"], job["seed"]) == (training, validation, "yes-no", 7)
    assert job["metadata"] == {"team": "reviews"} and job["fine_tuned_model"] is None and job["error"] is None
    hyperparameters = {"n_epochs": 3, "batch_size": 4, "learning_rate_multiplier": 0.5}
    assert job["hyperparameters"] == hyperparameters
    assert job["method"] == {"type": "supervised", "supervised": {"hyperparameters": hyperparameters}}
    assert (job["organization_id"], job["result_files"], job["integrations"], job["finished_at"]) == ("softserve", [], [], None)
    # The same job through /train-jobs, with softserve's own settings and the mapped hyperparameters.
    same = client.get(f"/train-jobs/{job['id']}").json()
    assert job["softserve"] == same and same["name"] == "yes-no"
    params = same["params"]
    assert (params["epochs"], params["batch_size"], params["learning_rate"], params["seed"]) == (3, 4, 0.15, 7)
    assert (params["num_virtual_tokens"], params["template"], params["eval_every"]) == (6, "Q: {input}\nA:", 2)
    assert (same["train_examples"], same["validation_examples"]) == (10, 1)
    # Its dataset copied from the files, as /train-jobs stores one.
    runtime = client.app.state.runtime
    dataset = runtime.storage.read_all(storage.dataset_key(job["id"]))
    assert dataset == {"train.jsonl": client.get(f"/v1/files/{training}/content").content,
                       "validation.jsonl": client.get(f"/v1/files/{validation}/content").content}
    row = stored_job(client, job["id"])
    assert (row.suffix, row.training_file, row.validation_file, row.job_metadata, row.base_adapter_id) == (
        "yes-no", training, validation, {"team": "reviews"}, None)
    assert client.get(f"/v1/fine_tuning/jobs/{job['id']}").json() == job


def test_defaults_and_the_older_top_level_hyperparameters(client):
    job = created(client)
    assert job["hyperparameters"] == {"n_epochs": "auto", "batch_size": 8, "learning_rate_multiplier": 1.0}
    params = job["softserve"]["params"]
    assert (params["method"], params["num_virtual_tokens"], params["max_steps"], params["epochs"]) == (
        "prompt_tuning", 20, None, None)
    assert job["softserve"]["name"] == f"adapter-{job['id']}"
    older = created(client, hyperparameters={"n_epochs": 2, "batch_size": "auto", "learning_rate_multiplier": 2})
    assert older["hyperparameters"] == {"n_epochs": 2, "batch_size": 8, "learning_rate_multiplier": 2.0}
    prefix = created(client, hyperparameters={"learning_rate_multiplier": 0.5}, softserve={"method": "prefix_tuning"})
    assert prefix["softserve"]["params"]["learning_rate"] == 0.005  # half of prefix tuning's default


@pytest.mark.parametrize(
    "body, param, text",
    [
        ({"hyperparameters": {"n_epochs": 0}}, "hyperparameters", "n_epochs"),
        ({"hyperparameters": {"batch_size": "many"}}, "hyperparameters", "batch_size"),
        ({"hyperparameters": {"learning_rate_multiplier": -1}}, "hyperparameters", "learning_rate_multiplier"),
        ({"hyperparameters": {"learning_rate_multiplier": 50}}, "hyperparameters", "learning_rate_multiplier"),
        ({"hyperparameters": {"warmup": 3}}, "hyperparameters", "warmup"),
        ({"hyperparameters": {"n_epochs": 2}, "method": {"type": "supervised", "supervised": {
            "hyperparameters": {"n_epochs": 2}}}}, None, "not both"),
        ({"method": {"type": "dpo", "dpo": {}}}, "method", "method.type"),
        ({"method": {"type": "supervised", "supervised": {"hyperparameters": {"n_epochs": 1}}},
          "softserve": {"max_steps": 5}}, "method", "max_steps or epochs"),
        ({"softserve": {"num_virtual_tokens": 0}}, "softserve", "num_virtual_tokens"),
        ({"softserve": {"num_virtual_tokens": 9}}, "softserve", "at most 8"),
        ({"softserve": {"template": "no placeholder"}}, "softserve", "{input}"),
        ({"softserve": {"method": "lora"}}, "softserve", "method"),
        ({"softserve": {"max_steps": 4, "eval_every": 5}}, "softserve", "eval_every"),
        ({"softserve": {"epochs": 2}}, "softserve", "n_epochs"),
        ({"softserve": {"colour": "red"}}, "softserve", "colour"),
        ({"suffix": "a:b"}, "suffix", "suffix"),
        ({"suffix": "x" * 65}, "suffix", "suffix"),
        ({"seed": -1}, "seed", "seed"),
        ({"metadata": {f"k{i}": "v" for i in range(17)}}, "metadata", "metadata"),
        ({"metadata": {"k": "v" * 513}}, "metadata", "metadata"),
        ({"metadata": {"k": 1}}, "metadata", "metadata"),
        ({"integrations": [{"type": "wandb"}]}, "integrations", "integrations"),
        ({"model": ""}, "model", "model"),
    ],
)
def test_bad_fields_get_422_naming_them(make_client, tiny_base, body, param, text):
    client = make_client(tiny_base, max_virtual_tokens=8)
    error = openai_error(create(client, **body), 422, param)
    assert text in error["message"]
    assert client.get("/train-jobs").json()["total"] == 0


def test_unknown_files_and_models_are_404_naming_the_field(client):
    assert openai_error(create(client, training_file="file-nope"), 404, "training_file")["code"] == "file_not_found"
    openai_error(create(client, validation_file="file-nope"), 404, "validation_file")
    assert openai_error(create(client, model="no-such-model"), 404, "model")["code"] == "model_not_found"
    openai_error(create(client, model="ft:base:x:nope"), 404, "model")
    assert client.get("/train-jobs").json()["total"] == 0


def test_training_and_validation_files_must_be_of_one_format(client):
    training, validation = upload_file(client), upload_file(client)
    with client.app.state.runtime.sessions() as session:  # as a chat file reads (app.uploaded_files.dataset_format)
        session.execute(storage_format_update(validation, "chat"))
        session.commit()
    error = openai_error(create(client, training_file=training, validation_file=validation), 422, "validation_file")
    assert "chat" in error["message"]


def storage_format_update(file_id, file_format):
    from sqlalchemy import update

    from app.models import UploadedFile

    return update(UploadedFile).where(UploadedFile.id == file_id).values(format=file_format)


def test_a_job_continues_from_an_adapter_of_the_same_method_and_size(client, tiny_base):
    adapter = upload_adapter(client, random_soft_prompt(tiny_base, 5, seed=1), name="start")
    adapter_id = adapter["id"]
    with client.app.state.runtime.sessions() as session:
        session.get(Adapter, adapter_id).template = "Q: {input}\nA:"
        session.commit()
    job = created(client, model=adapter_id)
    assert job["model"] == adapter_id and stored_job(client, job["id"]).base_adapter_id == adapter_id
    params = job["softserve"]["params"]  # the adapter's size, method and template by default
    assert (params["num_virtual_tokens"], params["method"], params["template"]) == (5, "prompt_tuning", "Q: {input}\nA:")
    by_name = created(client, model=fine_tuned_model(tiny_base.name, "x", adapter_id), softserve={"num_virtual_tokens": 5})
    assert stored_job(client, by_name["id"]).base_adapter_id == adapter_id
    error = openai_error(create(client, model=adapter_id, softserve={"num_virtual_tokens": 6}), 422, "softserve")
    assert "same num_virtual_tokens" in error["message"]
    error = openai_error(create(client, model=adapter_id, softserve={"method": "prefix_tuning"}), 422, "softserve")
    assert "same method" in error["message"]


def test_a_prefix_adapter_continues_as_prefix_tuning_only(client, tiny_base):
    prefix = random_prefix_kv(tiny_base, 3, seed=2).prefix_kv
    files = encode_prefix_adapter(to_flat(prefix), tiny_base.kv_shape, tiny_base.fingerprint, tiny_base.name)
    response = client.post("/adapters", data={"name": "prefix"},
                           files={"config": (CONFIG_NAME, files[CONFIG_NAME]), "weights": (WEIGHTS_NAME, files[WEIGHTS_NAME])})
    adapter_id = response.json()["id"]
    params = created(client, model=adapter_id)["softserve"]["params"]
    assert (params["method"], params["num_virtual_tokens"], params["learning_rate"]) == ("prefix_tuning", 3, 0.01)
    error = openai_error(create(client, model=adapter_id, softserve={"method": "prompt_tuning"}), 422, "softserve")
    assert "same method" in error["message"]
    error = openai_error(create(client, model=adapter_id, softserve={"prefix_projection": True}), 422, "softserve")
    assert "projection" in error["message"]


def test_an_adapter_for_another_base_model_cannot_be_continued(client, tiny_base):
    adapter_id = upload_adapter(client, random_soft_prompt(tiny_base, 4, seed=1))["id"]
    with client.app.state.runtime.sessions() as session:
        session.get(Adapter, adapter_id).base_fingerprint = "other-model@0123456789abcdef"
        session.commit()
    assert "other-model" in openai_error(create(client, model=adapter_id), 422, "model")["message"]


def test_list_newest_first_with_after_and_limit_including_train_jobs(client):
    made = [created(client)["id"] for _ in range(2)]
    made.append(client.post("/train-jobs", files={"file": ("t.jsonl", GOOD)}).json()["id"])
    listed = client.get("/v1/fine_tuning/jobs").json()
    assert listed["object"] == "list" and not listed["has_more"]
    assert sorted(j["id"] for j in listed["data"]) == sorted(made)
    newest_first = [j["id"] for j in listed["data"]]
    assert newest_first[0] == made[2]  # the /train-jobs one, made last
    train_jobs_one = listed["data"][0]
    assert (train_jobs_one["training_file"], train_jobs_one["suffix"], train_jobs_one["metadata"]) == (None, None, None)
    page = client.get("/v1/fine_tuning/jobs", params={"limit": 2}).json()
    assert [j["id"] for j in page["data"]] == newest_first[:2] and page["has_more"]
    rest = client.get("/v1/fine_tuning/jobs", params={"limit": 2, "after": newest_first[1]}).json()
    assert [j["id"] for j in rest["data"]] == newest_first[2:] and not rest["has_more"]
    openai_error(client.get("/v1/fine_tuning/jobs", params={"after": "nope"}), 404, "after")
    openai_error(client.get("/v1/fine_tuning/jobs/nope"), 404, "fine_tuning_job_id")
    openai_error(client.get("/v1/fine_tuning/jobs/nope/events"), 404, "fine_tuning_job_id")
    openai_error(client.post("/v1/fine_tuning/jobs/nope/cancel"), 404, "fine_tuning_job_id")


def test_cancel_then_409(client):
    job_id = created(client)["id"]
    cancelled = client.post(f"/v1/fine_tuning/jobs/{job_id}/cancel")
    assert cancelled.status_code == 200 and cancelled.json()["status"] == "cancelled"
    assert cancelled.json()["finished_at"] is not None
    assert client.get(f"/train-jobs/{job_id}").json()["status"] == "cancelled"
    openai_error(client.post(f"/v1/fine_tuning/jobs/{job_id}/cancel"), 409, "fine_tuning_job_id")


def test_events_newest_first_as_openai_metrics_and_messages(client):
    job_id = created(client)["id"]
    with client.app.state.runtime.sessions() as session:
        session.get(TrainJob, job_id).total_steps = 4
        jobs.add_event(session, job_id, "train", 1, loss=1.25, epoch=0.1)
        jobs.add_event(session, job_id, "eval", 2, loss=0.75, accuracy=0.5)
        jobs.add_event(session, job_id, "message", message="webhook not delivered yet", level="warn")
        session.get(TrainJob, job_id).status = JobStatus.FAILED
        session.get(TrainJob, job_id).error_code = "training_error"
        session.get(TrainJob, job_id).error_message = "training failed: boom"
        session.get(TrainJob, job_id).finished_at = utcnow()
        jobs.add_event(session, job_id, "message", message="training failed: boom")
        session.commit()
    events = client.get(f"/v1/fine_tuning/jobs/{job_id}/events").json()
    assert events["object"] == "list" and not events["has_more"]
    failed, warned, evaluated, trained, queued = events["data"]
    assert all(e["object"] == "fine_tuning.job.event" and e["id"].startswith("ftevent-") for e in events["data"])
    assert (queued["type"], queued["level"], queued["message"], queued["data"]) == ("message", "info", "queued", None)
    assert (trained["type"], trained["level"]) == ("metrics", "info")
    assert trained["data"] == {"step": 1, "train_loss": 1.25, "total_steps": 4}
    assert trained["message"] == "Step 1/4: training loss=1.2500"
    assert evaluated["data"] == {"step": 2, "valid_loss": 0.75, "valid_mean_token_accuracy": 0.5}
    assert (failed["level"], failed["message"]) == ("error", "training failed: boom")
    assert (warned["level"], warned["type"]) == ("warn", "message")  # a level the event names itself
    page = client.get(f"/v1/fine_tuning/jobs/{job_id}/events", params={"limit": 2, "after": evaluated["id"]}).json()
    assert [e["id"] for e in page["data"]] == [trained["id"], queued["id"]] and not page["has_more"]
    assert client.get(f"/v1/fine_tuning/jobs/{job_id}/events", params={"limit": 1}).json()["has_more"]
    openai_error(client.get(f"/v1/fine_tuning/jobs/{job_id}/events", params={"after": "7"}), 422, "after")
    job = client.get(f"/v1/fine_tuning/jobs/{job_id}").json()
    assert job["status"] == "failed" and job["error"] == {"code": "training_error", "message": "training failed: boom",
                                                          "param": None}


def test_fine_tuned_names_serve_completions_and_are_listed(client, tiny_base):
    job_id = created(client, suffix="named")["id"]
    adapter_id = upload_adapter(client, random_soft_prompt(tiny_base, 4, seed=5))["id"]
    with client.app.state.runtime.sessions() as session:  # as a run that succeeded leaves it
        job = session.get(TrainJob, job_id)
        job.status, job.adapter_id, job.finished_at = JobStatus.SUCCEEDED, adapter_id, utcnow()
        session.get(Adapter, adapter_id).source = "trained"
        session.commit()
    name = client.get(f"/v1/fine_tuning/jobs/{job_id}").json()["fine_tuned_model"]
    assert name == f"ft:{tiny_base.name}:named:{adapter_id}"
    ask = {"prompt": "a fine film", "max_tokens": 5, "temperature": 0}
    by_id = client.post("/v1/completions", json=ask | {"model": adapter_id}).json()["choices"][0]["text"]
    for model in (name, f"{name}:ckpt-step-3"):
        response = client.post("/v1/completions", json=ask | {"model": model})
        assert response.status_code == 200 and response.json()["choices"][0]["text"] == by_id
        assert response.json()["model"] == model
    assert by_id != client.post("/v1/completions", json=ask | {"model": tiny_base.name}).json()["choices"][0]["text"]
    assert [m["id"] for m in client.get("/v1/models").json()["data"]] == [tiny_base.name, adapter_id, name]


def test_an_inference_key_reads_jobs_but_cannot_create_or_cancel(client):
    with client.app.state.runtime.sessions() as session:
        _, admin_key = auth.create_key(session, "admin", "ops")
        _, inference_key = auth.create_key(session, "inference", "app")
    admin, inference = {"Authorization": f"Bearer {admin_key}"}, {"Authorization": f"Bearer {inference_key}"}
    file_id = client.post("/v1/files", files={"file": ("t.jsonl", GOOD)}, data={"purpose": "fine-tune"},
                          headers=admin).json()["id"]
    body = {"model": client.app.state.runtime.base.name, "training_file": file_id}
    openai_error(client.post("/v1/fine_tuning/jobs", json=body, headers=inference), 403)
    job_id = client.post("/v1/fine_tuning/jobs", json=body, headers=admin).json()["id"]
    for path in ("/v1/fine_tuning/jobs", f"/v1/fine_tuning/jobs/{job_id}", f"/v1/fine_tuning/jobs/{job_id}/events"):
        assert client.get(path, headers=inference).status_code == 200
    openai_error(client.post(f"/v1/fine_tuning/jobs/{job_id}/cancel", headers=inference), 403)
    openai_error(client.get("/v1/fine_tuning/jobs"), 401)
    assert client.get(f"/v1/fine_tuning/jobs/{job_id}", headers=inference).json()["status"] == "queued"


def test_a_jobs_webhook_url_shows_only_its_origin(client):
    """Its path, query and credentials may carry a token, and inference keys read jobs."""
    job_id = created(client, metadata={"team": "reviews"})["id"]
    with client.app.state.runtime.sessions() as session, session.begin():
        session.get(TrainJob, job_id).job_metadata = {
            "team": "reviews", "webhook_url": "https://user:pw@hooks.example.com:8443/t/SECRET?token=abc"}
    shown = {"team": "reviews", "webhook_url": "https://hooks.example.com:8443"}
    assert client.get(f"/v1/fine_tuning/jobs/{job_id}").json()["metadata"] == shown
    assert client.get("/v1/fine_tuning/jobs").json()["data"][0]["metadata"] == shown
    with client.app.state.runtime.sessions() as session, session.begin():
        session.get(TrainJob, job_id).job_metadata = {"webhook_url": "http://[::1/SECRET"}  # no URL: nothing shown
    assert client.get(f"/v1/fine_tuning/jobs/{job_id}").json()["metadata"] == {}


def test_broker_down_gives_503_and_stores_nothing(make_client, tiny_base):
    client = make_client(tiny_base, redis_url="redis://127.0.0.1:1/0")  # nothing listens there
    response = create(client)
    assert response.status_code == 503 and "job queue unavailable" in response.json()["error"]["message"]
    assert response.headers["retry-after"] == "5"
    with client.app.state.runtime.sessions() as session:
        assert session.scalar(select(func.count()).select_from(TrainJob)) == 0
        assert session.scalar(select(func.count()).select_from(JobEvent)) == 0
    assert client.app.state.runtime.storage.keys(storage.DATASETS) == []


@pytest.fixture
def node(tmp_path, sqlite_url, tiny_base):
    """A node that serves and trains: uvicorn, the engine and the Celery consumer around the tiny model."""
    settings = make_settings(tmp_path, sqlite_url)
    with LiveServer(create_app(settings, base=tiny_base, services=[training_consumer])) as server:
        yield server


def test_the_openai_client_uploads_tunes_watches_and_serves_the_result(node, tiny_base, tmp_path):
    client = openai.OpenAI(base_url=node.url + "/v1", api_key="unused", max_retries=0)
    (tmp_path / "train.jsonl").write_bytes(sst2_slice("train", 40))
    (tmp_path / "valid.jsonl").write_bytes(sst2_slice("validation", 8))
    training = client.files.create(file=(tmp_path / "train.jsonl").open("rb"), purpose="fine-tune")
    validation = client.files.create(file=(tmp_path / "valid.jsonl").open("rb"), purpose="fine-tune")
    assert training.id.startswith("file-") and training.status == "processed"
    assert [f.id for f in client.files.list()] == [validation.id, training.id]
    job = client.fine_tuning.jobs.create(
        model=tiny_base.name, training_file=training.id, validation_file=validation.id, suffix="sst2", seed=3,
        method={"type": "supervised", "supervised": {"hyperparameters": {"batch_size": 4}}},
        extra_body={"softserve": {"num_virtual_tokens": 4, "max_steps": 6, "eval_every": 3, "template": "{input} =>"}})
    assert job.status in ("queued", "running") and job.hyperparameters.batch_size == 4
    assert client.fine_tuning.jobs.retrieve(job.id).id == job.id
    wait_until(lambda: client.fine_tuning.jobs.retrieve(job.id).status == "succeeded", "the job succeeds")
    done = client.fine_tuning.jobs.retrieve(job.id)
    assert done.fine_tuned_model.startswith(f"ft:{tiny_base.name}:sst2:") and done.finished_at >= done.created_at
    events = client.fine_tuning.jobs.list_events(job.id, limit=100).data
    metrics = [e for e in events if e.type == "metrics"]
    assert [e.data["step"] for e in metrics if "train_loss" in e.data] == [6, 5, 4, 3, 2, 1]
    assert {e.data["step"] for e in metrics if "valid_loss" in e.data} >= {3, 6}
    assert events[-1].message == "queued" and "registered" in events[0].message
    assert [j.id for j in client.fine_tuning.jobs.list()] == [job.id]
    prompt = "a gorgeous, witty, seductive film =>"
    tuned = client.completions.create(model=done.fine_tuned_model, prompt=prompt, max_tokens=3, temperature=0)
    by_id = client.completions.create(model=done.fine_tuned_model.split(":")[3], prompt=prompt, max_tokens=3,
                                      temperature=0)
    assert tuned.model == done.fine_tuned_model and tuned.choices[0].text == by_id.choices[0].text
    assert done.fine_tuned_model in [m.id for m in client.models.list()]
    content = client.files.content(training.id).content
    assert [json.loads(line) for line in content.decode().splitlines()] == [
        json.loads(line) for line in sst2_slice("train", 40).decode().splitlines()]
    assert client.files.delete(training.id).deleted  # the job has ended: its file may go
    with pytest.raises(openai.NotFoundError):
        client.files.retrieve(training.id)
    with httpx.Client(base_url=node.url) as http:  # the same job through /train-jobs
        assert http.get(f"/train-jobs/{job.id}").json()["adapter_id"] == done.fine_tuned_model.split(":")[3]


def test_pause_and_resume_a_queued_job_then_409_when_the_state_does_not_allow_it(client):
    job_id = created(client)["id"]
    openai_error(client.post(f"/v1/fine_tuning/jobs/{job_id}/resume"), 409, "fine_tuning_job_id")  # not paused
    paused = client.post(f"/v1/fine_tuning/jobs/{job_id}/pause")
    assert paused.status_code == 200 and paused.json()["object"] == "fine_tuning.job"
    assert paused.json()["status"] == "paused" and client.get(f"/train-jobs/{job_id}").json()["status"] == "paused"
    assert "paused" in openai_error(client.post(f"/v1/fine_tuning/jobs/{job_id}/pause"), 409,
                                    "fine_tuning_job_id")["message"]
    resumed = client.post(f"/v1/fine_tuning/jobs/{job_id}/resume")
    assert resumed.status_code == 200 and resumed.json()["status"] == "queued"
    messages = [e["message"] for e in client.get(f"/v1/fine_tuning/jobs/{job_id}/events").json()["data"]]
    assert messages[:2] == ["resumed", "paused while queued"]
    client.post(f"/v1/fine_tuning/jobs/{job_id}/cancel")
    openai_error(client.post(f"/v1/fine_tuning/jobs/{job_id}/pause"), 409, "fine_tuning_job_id")
    openai_error(client.post(f"/v1/fine_tuning/jobs/{job_id}/resume"), 409, "fine_tuning_job_id")
    for action in ("pause", "resume"):
        openai_error(client.post(f"/v1/fine_tuning/jobs/nope/{action}"), 404, "fine_tuning_job_id")


def test_resume_sends_the_job_to_the_queue(client, monkeypatch):
    job_id = created(client)["id"]
    client.post(f"/v1/fine_tuning/jobs/{job_id}/pause")
    sent = []
    monkeypatch.setattr(client.app.state.runtime, "enqueue_training", sent.append)
    assert client.post(f"/v1/fine_tuning/jobs/{job_id}/resume").json()["status"] == "queued"
    assert sent == [job_id]


def test_checkpoints_list_newest_first_with_openai_names_that_serve(client, tiny_base):
    job_id = created(client, suffix="ck")["id"]
    adapters = [upload_adapter(client, random_soft_prompt(tiny_base, 4, seed=s), name=f"c{s}")["id"] for s in (1, 2, 3)]
    with client.app.state.runtime.sessions() as session:  # as a run stores them at steps 2, 4, 6
        for step, adapter_id in zip((2, 4, 6), adapters, strict=True):
            session.add(JobCheckpoint(id=jobs.checkpoint_id(adapter_id), job_id=job_id, adapter_id=adapter_id, step=step,
                                      metrics={"step": step, "train_loss": 1.0 / step, "eval_loss": 2.0 / step,
                                               "eval_accuracy": step / 10}))
        session.commit()
    listed = client.get(f"/v1/fine_tuning/jobs/{job_id}/checkpoints").json()
    assert listed["object"] == "list" and not listed["has_more"]
    newest = listed["data"][0]
    assert [c["step_number"] for c in listed["data"]] == [6, 4, 2]
    assert newest == {"id": f"ftckpt-{adapters[2]}", "object": "fine_tuning.job.checkpoint",
                      "created_at": newest["created_at"], "fine_tuning_job_id": job_id, "step_number": 6,
                      "fine_tuned_model_checkpoint": f"ft:{tiny_base.name}:ck:{adapters[2]}:ckpt-step-6",
                      "metrics": {"step": 6, "train_loss": 1 / 6, "valid_loss": 2 / 6, "valid_mean_token_accuracy": 0.6}}
    assert (listed["first_id"], listed["last_id"]) == (newest["id"], listed["data"][-1]["id"])
    page = client.get(f"/v1/fine_tuning/jobs/{job_id}/checkpoints", params={"limit": 1, "after": newest["id"]}).json()
    assert [c["step_number"] for c in page["data"]] == [4] and page["has_more"]
    openai_error(client.get(f"/v1/fine_tuning/jobs/{job_id}/checkpoints", params={"after": "ftckpt-nope"}), 404, "after")
    openai_error(client.get("/v1/fine_tuning/jobs/nope/checkpoints"), 404, "fine_tuning_job_id")
    # A checkpoint's name is a `model` for completions and chat: its own adapter's prompt.
    ask = {"max_tokens": 4, "temperature": 0}
    name = newest["fine_tuned_model_checkpoint"]
    by_id = client.post("/v1/completions", json=ask | {"model": adapters[2], "prompt": "a film"}).json()
    by_name = client.post("/v1/completions", json=ask | {"model": name, "prompt": "a film"}).json()
    assert by_name["choices"][0]["text"] == by_id["choices"][0]["text"] and by_name["model"] == name
    chat = {"messages": [{"role": "user", "content": "a film"}]} | ask
    chat_by_id = client.post("/v1/chat/completions", json=chat | {"model": adapters[2]}).json()
    chat_by_name = client.post("/v1/chat/completions", json=chat | {"model": name})
    assert chat_by_name.status_code == 200, chat_by_name.text
    assert chat_by_name.json()["choices"][0]["message"] == chat_by_id["choices"][0]["message"]


def test_a_webhook_url_in_metadata_must_be_allowed(make_client, tiny_base):
    secret = "whsec_" + "A" * 40
    off = make_client(tiny_base)
    error = openai_error(create(off, metadata={"webhook_url": "https://hooks.example.com/x"}), 422, "metadata")
    assert "webhooks are off" in error["message"]
    client = make_client(tiny_base, webhook_secret=secret, webhook_allowed_hosts="hooks.example.com,*")
    for url, text in (("http://127.0.0.1:9/x", "private, loopback"), ("ftp://hooks.example.com/x", "http or https"),
                      ("https://user:pw@hooks.example.com/x", "credentials")):
        assert text in openai_error(create(client, metadata={"webhook_url": url}), 422, "metadata")["message"], url
    assert client.get("/train-jobs").json()["total"] == 0
    job = created(client, metadata={"webhook_url": "https://hooks.example.com/x", "team": "a"})
    assert job["metadata"]["webhook_url"] == "https://hooks.example.com"  # shown as its origin only: a path may carry a token


def test_an_inference_key_reads_checkpoints_but_cannot_pause_or_resume(client):
    with client.app.state.runtime.sessions() as session:
        _, admin_key = auth.create_key(session, "admin", "ops")
        _, inference_key = auth.create_key(session, "inference", "app")
    admin, inference = {"Authorization": f"Bearer {admin_key}"}, {"Authorization": f"Bearer {inference_key}"}
    file_id = client.post("/v1/files", files={"file": ("t.jsonl", GOOD)}, data={"purpose": "fine-tune"},
                          headers=admin).json()["id"]
    body = {"model": client.app.state.runtime.base.name, "training_file": file_id}
    job_id = client.post("/v1/fine_tuning/jobs", json=body, headers=admin).json()["id"]
    assert client.get(f"/v1/fine_tuning/jobs/{job_id}/checkpoints", headers=inference).json()["data"] == []
    for action in ("pause", "resume"):
        openai_error(client.post(f"/v1/fine_tuning/jobs/{job_id}/{action}", headers=inference), 403)
    assert client.post(f"/v1/fine_tuning/jobs/{job_id}/pause", headers=admin).json()["status"] == "paused"
