"""run_job against a real SQLite registry and the tiny model: claim, duplicates, cancel,
failure, and the reaper for lost workers."""

import json
import threading
from datetime import timedelta

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

from app import jobs, registry
from app.adapter_files import CONFIG_NAME, read_served
from app.datasets import Example, to_jsonl
from app.db import make_engine, make_session_factory
from app.engine.generation import first_step_logits
from app.engine.prefix_kv import from_flat
from app.engine.requests import GenerationRequest, SoftPrompt
from app.models import utcnow
from app.storage import adapter_key, dataset_key, make_storage
from app.train_config import TrainConfig
from tests.conftest import make_settings
from tests.test_peft_interop import peft_logits
from worker.job_runner import run_job

EXAMPLES = [Example(f"review {i} was {'good' if i % 2 else 'bad'}", ["negative", "positive"][i % 2]) for i in range(24)]


@pytest.fixture
def env(tmp_path, sqlite_url):
    settings = make_settings(tmp_path, sqlite_url, heartbeat_interval_s=0.2, job_stale_after_s=1.0)
    engine = make_engine(sqlite_url)
    yield settings, make_session_factory(engine)
    engine.dispose()


def queue_job(settings, sessions, job_id="job1", **config) -> str:
    """A queued job with its dataset in the storage `settings` choose, as POST /train-jobs leaves it."""
    defaults = {"num_virtual_tokens": 4, "max_steps": 6, "eval_every": 3, "template": "{input} =>"}
    params = TrainConfig(**(defaults | config)).to_dict()
    key = dataset_key(job_id)
    with sessions() as session, make_storage(settings, sessions).storing(session, key, {"train.jsonl": to_jsonl(EXAMPLES)}):
        jobs.create_job(session, job_id=job_id, name="tiny-job", params=params, dataset_path=key,
                        train_examples=len(EXAMPLES), validation_examples=0)
    return job_id


def replace_dataset(settings, sessions, job_id: str, train_jsonl: str) -> None:
    """Store other content as the job's training file (a corrupt one, say)."""
    storage, key = make_storage(settings, sessions), dataset_key(job_id)
    storage.delete(key)
    with sessions() as session, storage.storing(session, key, {"train.jsonl": train_jsonl.encode()}):
        session.commit()


def test_job_succeeds_and_registers_its_adapter(env, tiny_base):
    settings, sessions = env
    job_id = queue_job(settings, sessions)
    assert run_job(job_id, settings=settings, sessions=sessions, base=tiny_base) == "succeeded"
    with sessions() as session:
        job = jobs.get_job(session, job_id)
        assert (job.status, job.step, job.total_steps, job.attempts) == ("succeeded", 6, 6, 1)
        adapter = registry.get_adapter(session, job.adapter_id)
        assert adapter.source == "trained" and adapter.template == "{input} =>"
        assert adapter.metrics["steps"] == 6 and adapter.metrics["eval_accuracy"] == job.eval_accuracy
        kinds = [e.kind for e in jobs.list_events(session, job_id)]
    assert kinds.count("train") == 6 and kinds.count("eval") == 2
    stored = make_storage(settings, sessions).read_all(adapter_key(adapter.id))
    assert read_served(stored)[0].shape == (4, tiny_base.hidden_size)


def test_a_prefix_tuning_job_registers_a_peft_prefix_adapter_that_serves_its_logits(env, tiny_base, tiny_model_dir,
                                                                                      tmp_path):
    settings, sessions = env
    job_id = queue_job(settings, sessions, method="prefix_tuning", prefix_projection=True)
    assert run_job(job_id, settings=settings, sessions=sessions, base=tiny_base) == "succeeded"
    with sessions() as session:
        adapter = registry.get_adapter(session, jobs.get_job(session, job_id).adapter_id)
    files = make_storage(settings, sessions).read_all(adapter_key(adapter.id))
    prefix, is_prefix = read_served(files)
    assert is_prefix and adapter.num_virtual_tokens == 4
    config = json.loads(files[CONFIG_NAME])
    assert (config["peft_type"], config["prefix_projection"], config["encoder_hidden_size"]) == (
        "PREFIX_TUNING", True, tiny_base.hidden_size)
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), tmp_path)
    ids = tiny_base.tokenizer("review 3 was =>").input_ids
    served = SoftPrompt.prefix(from_flat(prefix, tiny_base.kv_shape))
    torch.testing.assert_close(first_step_logits(tiny_base, [GenerationRequest(ids, served, 1)])[0],
                               peft_logits(peft_model.eval(), ids), atol=1e-4, rtol=1e-4)


def test_duplicate_delivery_trains_once(env, tiny_base):
    settings, sessions = env
    job_id = queue_job(settings, sessions)
    outcomes = []
    threads = [threading.Thread(target=lambda: outcomes.append(
        run_job(job_id, settings=settings, sessions=sessions, base=tiny_base))) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(outcomes) == ["skipped", "succeeded"]
    # A late redelivery after success does nothing either.
    assert run_job(job_id, settings=settings, sessions=sessions, base=tiny_base) == "skipped"
    with sessions() as session:
        assert registry.list_adapters(session)[1] == 1


def test_cancel_while_running_stops_within_a_few_steps(env, tiny_base):
    settings, sessions = env
    job_id = queue_job(settings, sessions, max_steps=100_000, eval_every=100_000)
    result = {}
    thread = threading.Thread(target=lambda: result.update(
        status=run_job(job_id, settings=settings, sessions=sessions, base=tiny_base)))
    thread.start()
    while True:
        with sessions() as session:
            if jobs.get_job(session, job_id).step >= 3:
                break
    with sessions() as session:
        assert jobs.cancel(session, job_id) == "running"  # asked to stop
    thread.join(timeout=30)
    assert result["status"] == "cancelled"
    with sessions() as session:
        job = jobs.get_job(session, job_id)
        assert job.status == "cancelled" and job.step < 100_000 and job.adapter_id is None
        assert registry.list_adapters(session)[1] == 0


def test_cancel_queued_job_is_immediate_and_the_task_then_skips(env, tiny_base):
    settings, sessions = env
    job_id = queue_job(settings, sessions)
    with sessions() as session:
        assert jobs.cancel(session, job_id) == "cancelled"
    assert run_job(job_id, settings=settings, sessions=sessions, base=tiny_base) == "skipped"


def test_training_error_fails_the_job_with_a_readable_message(env, tiny_base):
    settings, sessions = env
    job_id = queue_job(settings, sessions)
    replace_dataset(settings, sessions, job_id, '{"input": "x"}\n')  # corrupt in storage
    assert run_job(job_id, settings=settings, sessions=sessions, base=tiny_base) == "failed"
    with sessions() as session:
        job = jobs.get_job(session, job_id)
    assert job.error_code == "training_error" and "training failed: TypeError" in job.error_message


def test_reaper_requeues_a_lost_job_once_then_fails_it(env):
    settings, sessions = env
    job_id = queue_job(settings, sessions)
    stale = timedelta(seconds=settings.job_stale_after_s)
    for attempt in (1, 2):
        with sessions() as session:
            assert jobs.claim(session, job_id, f"worker-{attempt}")
            jobs.get_job(session, job_id).heartbeat_at = utcnow() - timedelta(minutes=5)  # the worker died
            session.commit()
            requeued = jobs.reap_stale(session, stale_after=stale, max_attempts=2)
            status = jobs.get_job(session, job_id).status
        if attempt == 1:
            assert requeued == [job_id] and status == "queued"
        else:
            assert requeued == [] and status == "failed"
    with sessions() as session:
        job = jobs.get_job(session, job_id)
        assert job.error_code == "worker_lost" and "worker-2 stopped responding" in job.error_message
        messages = [e.data["message"] for e in jobs.list_events(session, job_id) if e.kind == "message"]
    assert "worker worker-1 stopped responding; retrying" in messages  # the lost worker named, not None


def test_reaper_leaves_live_jobs_alone(env):
    settings, sessions = env
    job_id = queue_job(settings, sessions)
    with sessions() as session:
        jobs.claim(session, job_id, "alive")
        assert jobs.reap_stale(session, stale_after=timedelta(seconds=60), max_attempts=2) == []
        assert jobs.get_job(session, job_id).status == "running"


def test_a_stopping_node_gives_its_job_back_without_spending_an_attempt(env, tiny_base):
    settings, sessions = env
    job_id = queue_job(settings, sessions, max_steps=100_000, eval_every=100_000)
    stopping = threading.Event()
    threading.Timer(1.0, stopping.set).start()  # the node is told to stop while the job trains
    assert run_job(job_id, settings=settings, sessions=sessions, base=tiny_base, node_stopping=stopping) == "released"
    with sessions() as session:
        job = jobs.get_job(session, job_id)
        assert (job.status, job.attempts, job.sent_at, job.run_token, job.adapter_id) == ("queued", 0, None, None, None)
        assert "its node stopped" in jobs.list_events(session, job_id)[-1].data["message"]
        assert jobs.unsent(session, unsent_after=timedelta(0), resend_after=timedelta(hours=1)) == [job_id]
        assert jobs.claim(session, job_id, "another node") is not None  # any node takes it again


def test_a_job_over_its_time_limit_fails_and_says_so(env, tiny_base):
    settings, sessions = env
    job_id = queue_job(settings, sessions, max_steps=100_000, eval_every=100_000)
    no_time = settings.model_copy(update={"job_time_limit_s": 0})  # below the setting's floor of 60 s
    assert run_job(job_id, settings=no_time, sessions=sessions, base=tiny_base) == "failed"
    with sessions() as session:
        job = jobs.get_job(session, job_id)
        assert job.error_code == "time_limit" and "over the job time limit" in job.error_message
