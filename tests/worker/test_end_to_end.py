"""A real training node process (`python -m worker.node train`: its own model copy, a Celery
consumer, its engine), a real broker (Redis, or the embedded SQLite one) and the API: upload a
dataset, watch the job, serve the adapter it makes."""

import os
import signal
import subprocess
import sys
import time

import pytest
import redis

from tests.conftest import DATASETS, REPO

SST2_TEMPLATE = "Review: {input}\nSentiment:"


def sst2_slice(split: str, count: int) -> bytes:
    return "".join((DATASETS / "sst2" / f"{split}.jsonl").read_text().splitlines(keepends=True)[:count]).encode()


@pytest.fixture
def start_worker(tmp_path):
    """Start `python -m worker.node train` with the same settings as the API under test."""
    workers = []

    def _start(settings, **env) -> subprocess.Popen:
        environment = os.environ | {
            "DATA_DIR": str(settings.data_dir), "DATABASE_URL": settings.database_url,
            "HEARTBEAT_INTERVAL_S": str(settings.heartbeat_interval_s),
            "JOB_STALE_AFTER_S": str(settings.job_stale_after_s),
        } | env
        if settings.redis_url:
            environment["REDIS_URL"] = settings.redis_url
        log = open(tmp_path / f"worker-{len(workers)}.log", "w")
        process = subprocess.Popen(
            [sys.executable, "-m", "worker.node", "train"], cwd=REPO, env=environment, stdout=log, stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        workers.append(process)
        return process

    yield _start
    for process in workers:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


def wait_for(client, job_id, predicate, timeout=600):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = client.get(f"/train-jobs/{job_id}").json()
        if predicate(job):
            return job
        assert job["status"] not in ("failed", "cancelled") or predicate(job), job
        time.sleep(0.5)
    raise AssertionError(f"job {job_id} never got there: {job}")


def tiny_env(tiny_model_dir):
    return {"BASE_MODEL": str(tiny_model_dir), "QUANTIZATION": "fp32"}


@pytest.mark.real_model
def test_redis_worker_trains_real_model_and_adapter_serves_a_label(make_client, real_base, start_worker, redis_url):
    redis.Redis.from_url(redis_url).flushdb()
    client = make_client(real_base, redis_url=redis_url)
    start_worker(client.app.state.runtime.settings)
    response = client.post(
        "/train-jobs",
        files={"file": ("sst2.jsonl", sst2_slice("train", 160)), "validation_file": ("val.jsonl", sst2_slice("validation", 16))},
        data={"name": "sst2-e2e", "max_steps": "24", "eval_every": "12", "template": SST2_TEMPLATE},
    )
    assert response.status_code == 202, response.text
    job_id = response.json()["id"]
    running = wait_for(client, job_id, lambda j: j["status"] == "running" and j["progress"]["step"] > 0)
    assert running["estimated_finish"] is not None and running["progress"]["total_steps"] == 24
    job = wait_for(client, job_id, lambda j: j["status"] == "succeeded")
    assert job["progress"]["step"] == 24 and job["eval_accuracy"] is not None and job["error"] is None
    events = client.get(f"/train-jobs/{job_id}/events").json()
    assert [e["step"] for e in events if e["kind"] == "eval"] == [12, 24]
    assert len([e for e in events if e["kind"] == "train"]) == 24

    adapter = client.get(f"/adapters/{job['adapter_id']}").json()
    assert adapter["name"] == "sst2-e2e" and adapter["source"] == "trained" and adapter["template"] == SST2_TEMPLATE
    assert adapter["id"] in [a["id"] for a in client.get("/adapters").json()["items"]]
    for review in ("a gorgeous , witty , seductive movie .", "the story is boring and the acting is flat ."):
        out = client.post("/generate", json={"adapter_id": adapter["id"], "prompt": review, "apply_template": True,
                                              "max_new_tokens": 4, "stop": ["\n"]})
        assert out.status_code == 200, out.text
        # A label first (24 steps of training may still add a full stop after it).
        assert out.json()["text"].split()[0].strip(".") in ("positive", "negative"), out.json()


def test_embedded_broker_worker_runs_a_job_to_success(make_client, tiny_base, tiny_model_dir, start_worker):
    client = make_client(tiny_base)  # no REDIS_URL: kombu's SQLAlchemy transport on a SQLite file
    assert client.app.state.runtime.settings.broker_url.startswith("sqla+sqlite:///")
    start_worker(client.app.state.runtime.settings, **tiny_env(tiny_model_dir))
    response = client.post("/train-jobs", files={"file": ("t.jsonl", sst2_slice("train", 40))},
                           data={"max_steps": "10", "eval_every": "5", "num_virtual_tokens": "4"})
    job = wait_for(client, response.json()["id"], lambda j: j["status"] == "succeeded", timeout=300)
    assert job["progress"]["step"] == 10 and job["attempts"] == 1
    served = client.post("/generate", json={"adapter_id": job["adapter_id"], "prompt": "a fine film", "max_new_tokens": 3})
    assert served.status_code == 200 and served.json()["adapter_id"] == job["adapter_id"]


def test_redis_broker_worker_runs_a_job_to_success(make_client, tiny_base, tiny_model_dir, start_worker, redis_url):
    """Redis as the broker on the tiny model: the real-model run above takes minutes, this seconds."""
    redis.Redis.from_url(redis_url).flushdb()
    client = make_client(tiny_base, redis_url=redis_url)
    start_worker(client.app.state.runtime.settings, **tiny_env(tiny_model_dir))
    response = client.post("/train-jobs", files={"file": ("t.jsonl", sst2_slice("train", 40))},
                           data={"max_steps": "10", "eval_every": "5", "num_virtual_tokens": "4"})
    job = wait_for(client, response.json()["id"], lambda j: j["status"] == "succeeded", timeout=300)
    assert job["progress"]["step"] == 10 and job["attempts"] == 1 and job["adapter_id"]


def test_cancel_while_running_through_the_worker(make_client, tiny_base, tiny_model_dir, start_worker):
    client = make_client(tiny_base)
    start_worker(client.app.state.runtime.settings, **tiny_env(tiny_model_dir))
    job_id = client.post("/train-jobs", files={"file": ("t.jsonl", sst2_slice("train", 40))},
                         data={"max_steps": "1000000", "eval_every": "1000000"}).json()["id"]
    wait_for(client, job_id, lambda j: j["progress"]["step"] >= 2, timeout=300)
    assert client.post(f"/train-jobs/{job_id}/cancel").json()["cancel_requested"] is True
    job = wait_for(client, job_id, lambda j: j["status"] == "cancelled", timeout=60)
    assert job["adapter_id"] is None and job["progress"]["step"] < 1_000_000
    assert client.get("/adapters").json()["total"] == 0


def test_killed_worker_never_leaves_the_job_running(make_client, tiny_base, tiny_model_dir, start_worker):
    client = make_client(tiny_base, heartbeat_interval_s=0.5, job_stale_after_s=3)
    settings = client.app.state.runtime.settings
    first = start_worker(settings, **tiny_env(tiny_model_dir))
    job_id = client.post("/train-jobs", files={"file": ("t.jsonl", sst2_slice("train", 40))},
                         data={"max_steps": "1000000", "eval_every": "1000000"}).json()["id"]
    wait_for(client, job_id, lambda j: j["status"] == "running" and j["progress"]["step"] >= 2, timeout=300)
    os.killpg(first.pid, signal.SIGKILL)  # kill -9 the whole worker mid-job
    first.wait()
    # The API's reaper notices the silent heartbeat and queues the job again (attempt 2 of 2).
    requeued = wait_for(client, job_id, lambda j: j["status"] == "queued", timeout=60)
    assert requeued["attempts"] == 1
    messages = [e["data"].get("message", "") for e in client.get(f"/train-jobs/{job_id}/events").json()]
    assert any("stopped responding; retrying" in m for m in messages)
    start_worker(settings, **tiny_env(tiny_model_dir))
    retried = wait_for(client, job_id, lambda j: j["status"] == "running" and j["attempts"] == 2, timeout=300)
    assert retried["status"] == "running"
    client.post(f"/train-jobs/{job_id}/cancel")
    wait_for(client, job_id, lambda j: j["status"] == "cancelled", timeout=60)
