"""Fencing: a run that lost its claim (its worker stalled past JOB_STALE_AFTER_S, the job was
requeued and claimed again) can write nothing: no progress, no events, no finish, no adapter.
On SQLite and PostgreSQL; the real SIGSTOP once, on PostgreSQL (the multi-worker setup), as it
costs a process start."""

import os
import signal
import subprocess
import sys
import threading
import time
from datetime import timedelta

import psutil
import pytest

from app import jobs, registry
from app.db import make_engine, make_session_factory
from app.engine.device import InlineDevice
from app.models import utcnow
from app.storage import ADAPTERS, adapter_key, make_storage
from tests.conftest import REPO, make_settings, random_soft_prompt
from tests.worker.test_job_runner import queue_job
from worker.job_runner import run_job

# Runner A in its own process: it claims the job, then freezes (SIGSTOP) before training.
STALLING_RUNNER = """
import os, signal, sys
from pathlib import Path
from app.config import Settings
from app.db import make_engine, make_session_factory
from app.engine.device import InlineDevice
from app.engine.loader import load_base_model
from worker.job_runner import run_job

data_dir, database_url, model_dir, job_id = sys.argv[1:]
settings = Settings(data_dir=data_dir, database_url=database_url, heartbeat_interval_s=0.2, job_stale_after_s=1.0)
base = load_base_model(Path(model_dir), Path("unused"), quantization="fp32", device="cpu")

class StallFirst(InlineDevice):  # its first work comes right after the claim
    stalled = False

    def run_training_work(self, work):
        if not self.stalled:
            self.stalled = True
            os.kill(os.getpid(), signal.SIGSTOP)
        return work()

print(run_job(job_id, settings=settings, sessions=make_session_factory(make_engine(database_url)), base=base,
              device=StallFirst()))
"""


@pytest.fixture(params=["sqlite", "postgres"])
def env(request, tmp_path):
    url = request.getfixturevalue("sqlite_url" if request.param == "sqlite" else "postgres_url")
    engine = make_engine(url)
    yield make_settings(tmp_path, url, heartbeat_interval_s=0.2, job_stale_after_s=1.0), make_session_factory(engine)
    engine.dispose()


def reap_until_requeued(settings, sessions, job_id):
    stale = timedelta(seconds=settings.job_stale_after_s)
    for _ in range(200):  # its heartbeat goes stale after job_stale_after_s
        with sessions() as session:
            if jobs.reap_stale(session, stale_after=stale, max_attempts=settings.job_max_attempts) == [job_id]:
                return
        time.sleep(0.05)
    raise AssertionError("the stalled run was never reaped")


def finish_with_b_then_resume_a(settings, sessions, job_id, tiny_base, resume_a) -> list:
    """Runner B takes the requeued job and succeeds; then A resumes. Returns the events as B left them."""
    reap_until_requeued(settings, sessions, job_id)
    assert run_job(job_id, settings=settings, sessions=sessions, base=tiny_base) == "succeeded"
    with sessions() as session:
        events = [(e.id, e.kind, e.step, e.data) for e in jobs.list_events(session, job_id)]
    resume_a()
    return events


def assert_only_b_wrote(settings, sessions, job_id, events_after_b):
    with sessions() as session:
        job = jobs.get_job(session, job_id)
        assert registry.list_adapters(session)[1] == 1  # one job, one adapter
        # A wrote nothing: not a step, not an event, not the job's fields.
        assert [(e.id, e.kind, e.step, e.data) for e in jobs.list_events(session, job_id)] == events_after_b
        assert (job.status, job.step, job.attempts) == ("succeeded", 6, 2)
        assert events_after_b[-1][3]["message"].startswith(f"adapter {job.adapter_id} registered")
        made_by_b = [job.adapter_id] + [c.adapter_id for c in jobs.list_checkpoints(session, job_id)]
    # nor any adapter file (B's checkpoints are B's)
    assert sorted(make_storage(settings, sessions).keys(ADAPTERS)) == sorted(adapter_key(i) for i in made_by_b)


def test_two_runners_on_one_job_register_one_adapter(env, tiny_base):
    settings, sessions = env
    job_id = queue_job(settings, sessions)
    # Runner A stalls right after its claim, its heartbeat silent (as a frozen worker's would be).
    frozen_a = make_settings(settings.data_dir.parent, settings.database_url, heartbeat_interval_s=100, job_stale_after_s=300)
    resume, outcome = threading.Event(), []

    class Stalled(InlineDevice):
        def run_training_work(self, work):
            resume.wait()
            return work()

    runner_a = threading.Thread(target=lambda: outcome.append(
        run_job(job_id, settings=frozen_a, sessions=sessions, base=tiny_base, device=Stalled())))
    runner_a.start()
    try:
        events = finish_with_b_then_resume_a(settings, sessions, job_id, tiny_base, resume.set)
    finally:
        resume.set()
        runner_a.join()
    assert outcome == ["lost"]
    assert_only_b_wrote(settings, sessions, job_id, events)


@pytest.mark.parametrize("env", ["postgres"], indirect=True)
def test_a_worker_frozen_by_sigstop_registers_nothing_when_it_resumes(env, tiny_base, tiny_model_dir):
    settings, sessions = env
    job_id = queue_job(settings, sessions)
    stalled = subprocess.Popen(
        [sys.executable, "-c", STALLING_RUNNER, str(settings.data_dir), settings.database_url, str(tiny_model_dir), job_id],
        cwd=REPO, stdout=subprocess.PIPE, text=True,
    )
    try:
        process = psutil.Process(stalled.pid)
        for _ in range(2000):  # the process starts (imports torch), claims, then stops itself
            if process.status() == psutil.STATUS_STOPPED:
                break
            assert stalled.poll() is None, "runner A exited before stalling"
            time.sleep(0.05)
        else:
            raise AssertionError("runner A never claimed the job")
        events = finish_with_b_then_resume_a(settings, sessions, job_id, tiny_base,
                                             lambda: os.kill(stalled.pid, signal.SIGCONT))
        out, _ = stalled.communicate(timeout=120)
    finally:
        if stalled.poll() is None:
            stalled.kill()
            stalled.wait()
    assert out.split()[-1] == "lost"  # A noticed it no longer holds the job and stopped
    assert_only_b_wrote(settings, sessions, job_id, events)


def test_every_write_of_a_run_that_lost_its_claim_is_refused(env, tiny_base):
    settings, sessions = env
    job_id = queue_job(settings, sessions)
    with sessions() as session:
        run_a = jobs.claim(session, job_id, "worker-a")
        jobs.record_step(session, job_id, run_a, 1, 6, 0.1, 2.0)
        jobs.get_job(session, job_id).heartbeat_at = utcnow() - timedelta(minutes=5)  # A stalls
        session.commit()
        assert jobs.reap_stale(session, stale_after=timedelta(seconds=60), max_attempts=2) == [job_id]
        # Requeued, not yet claimed again: A's heartbeat must not revive the job.
        with pytest.raises(jobs.StaleRun):
            jobs.heartbeat(session, job_id, run_a)
        run_b = jobs.claim(session, job_id, "worker-b")
        assert run_b and run_b != run_a
        jobs.record_step(session, job_id, run_b, 1, 6, 0.1, 1.5)
        for stale_write in (lambda: jobs.heartbeat(session, job_id, run_a),
                            lambda: jobs.record_step(session, job_id, run_a, 2, 6, 0.2, 9.0),
                            lambda: jobs.record_eval(session, job_id, run_a, 2, 9.0, 0.0)):
            with pytest.raises(jobs.StaleRun):
                stale_write()
        adapter, _ = registry.new_adapter(
            name="from-a", prompt_embeddings=random_soft_prompt(tiny_base, 4, 0),
            base_fingerprint=tiny_base.fingerprint, base_model_name=tiny_base.name, source="trained")
        assert not jobs.finish(session, job_id, run_a, "succeeded", adapter=adapter, message="A done")
        assert not jobs.finish(session, job_id, run_a, "failed", message="A failed", error_code="training_error")
        # The adapter row went with the refused finish; B's run stands untouched and can finish.
        assert registry.list_adapters(session)[1] == 0
        job = jobs.get_job(session, job_id)
        assert (job.status, job.worker, job.step, job.train_loss, job.eval_loss) == ("running", "worker-b", 1, 1.5, None)
        assert [e.data.get("loss") for e in jobs.list_events(session, job_id) if e.kind == "train"] == [2.0, 1.5]
        assert not jobs.heartbeat(session, job_id, run_b)  # alive, no cancel asked
        assert jobs.finish(session, job_id, run_b, "cancelled", message="B cancelled")
        assert jobs.get_job(session, job_id).status == "cancelled"
