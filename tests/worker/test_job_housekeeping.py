"""What a job leaves behind: an error message that fits its column (PostgreSQL enforces the
length), and no dataset once the job has ended."""

import json
import time

from app import jobs
from app.db import make_engine, make_session_factory
from app.storage import DATASETS
from tests.api.test_train_jobs_api import GOOD
from tests.conftest import make_settings
from tests.worker.test_job_runner import queue_job, replace_dataset
from worker.job_runner import run_job


def test_a_huge_training_error_is_clipped_to_fit_and_the_job_fails_cleanly(tmp_path, postgres_url, tiny_base):
    settings = make_settings(tmp_path, postgres_url)
    engine = make_engine(postgres_url)
    sessions = make_session_factory(engine)
    job_id = queue_job(settings, sessions)
    # A corrupt line in storage: the TypeError names the unexpected key, 10,000 characters of it, and a NUL.
    key = "HEAD" + "x" * 10_000 + "\x00TAIL"
    replace_dataset(settings, sessions, job_id, json.dumps({"input": "a", "output": "b", key: 1}) + "\n")
    assert run_job(job_id, settings=settings, sessions=sessions, base=tiny_base) == "failed"
    with sessions() as session:
        job = jobs.get_job(session, job_id)
        last_event = jobs.list_events(session, job_id)[-1].data["message"]
    engine.dispose()
    message = job.error_message
    assert (job.status, job.error_code) == ("failed", "training_error")
    assert len(message) == jobs.ERROR_MESSAGE_MAX and last_event == message
    assert message.startswith("training failed: TypeError: Example.__init__() got an unexpected keyword argument 'HEADxxx")
    assert " [...] " in message and message.endswith("xxx\ufffdTAIL'")


def post_job(client, **fields):
    response = client.post("/train-jobs", files={"file": ("t.jsonl", GOOD)}, data={"max_steps": "2", **fields})
    assert response.status_code == 202, response.text
    return response.json()["id"]


def stored_datasets(runtime):
    return sorted(key.removeprefix(f"{DATASETS}/") for key in runtime.storage.keys(DATASETS))


def test_a_jobs_dataset_is_deleted_once_the_job_has_ended(make_client, tiny_base):
    client = make_client(tiny_base)
    runtime = client.app.state.runtime
    settings = runtime.settings
    cancelled, succeeded, failed, running, queued = (post_job(client, name=n) for n in ("c", "s", "f", "r", "q"))
    client.post(f"/train-jobs/{cancelled}/cancel")
    assert run_job(succeeded, settings=settings, sessions=runtime.sessions, base=tiny_base) == "succeeded"
    replace_dataset(settings, runtime.sessions, failed, '{"input": "x"}\n')
    assert run_job(failed, settings=settings, sessions=runtime.sessions, base=tiny_base) == "failed"
    with runtime.sessions() as session:
        assert jobs.claim(session, running, "busy-worker")

    assert sorted(runtime.job_upkeep.delete_ended_job_files()) == sorted(f"datasets/{j}" for j in (cancelled, succeeded, failed))
    assert stored_datasets(runtime) == sorted([running, queued])  # the runs to come still need theirs
    assert runtime.job_upkeep.delete_ended_job_files() == []
    # The job pages and the adapter do not need it.
    assert client.get(f"/train-jobs/{succeeded}").json()["status"] == "succeeded"
    adapter_id = client.get(f"/train-jobs/{succeeded}").json()["adapter_id"]
    assert client.get(f"/adapters/{adapter_id}/download").status_code == 200
    assert client.get(f"/admin/jobs/{succeeded}").status_code == 200


def test_the_reaper_deletes_datasets_even_while_the_broker_is_down(make_client, tiny_base):
    client = make_client(tiny_base, redis_url="redis://127.0.0.1:1/0", heartbeat_interval_s=0.05,
                         job_stale_after_s=0.2)  # a reaper pass every 0.05 s; each fails to send `waiting`
    runtime = client.app.state.runtime
    ended = queue_job(runtime.settings, runtime.sessions, "ended")
    waiting = queue_job(runtime.settings, runtime.sessions, "waiting")
    client.post(f"/train-jobs/{ended}/cancel")
    for _ in range(600):  # the reaper's loop, not this test, deletes it
        if stored_datasets(runtime) == [waiting]:
            break
        time.sleep(0.05)
    assert stored_datasets(runtime) == [waiting]
    assert client.get(f"/train-jobs/{waiting}").json()["status"] == "queued"
