"""Issue 25, items 3 and 4, through run_job on the tiny model and a real SQLite registry:
checkpoint adapters stored at each better evaluation and pruned when the job ends, warm start
from an adapter, and pause and resume to the result an uninterrupted run gives."""

import time
from datetime import timedelta

import pytest
import torch
from sqlalchemy import update

from app import checkpoints, jobs, registry
from app.adapter_files import read_served
from app.db import make_engine, make_session_factory
from app.job_status import JobStatus
from app.job_upkeep import JobUpkeep
from app.models import TrainJob, utcnow
from app.storage import DATASETS, TRAIN_STATES, NotStored, adapter_key, make_storage
from app.warm_start import warm_start_problem
from tests.conftest import make_settings
from tests.worker.test_job_runner import queue_job
from worker import train_state
from worker.job_runner import run_job


@pytest.fixture
def env(tmp_path, sqlite_url):
    settings = make_settings(tmp_path, sqlite_url, heartbeat_interval_s=0.2, job_stale_after_s=1.0)
    engine = make_engine(sqlite_url)
    yield settings, make_session_factory(engine)
    engine.dispose()


def served(settings, sessions, adapter_id: str) -> torch.Tensor:
    return read_served(make_storage(settings, sessions).read_all(adapter_key(adapter_id)))[0]


def final_adapter(sessions, job_id: str) -> str:
    with sessions() as session:
        return jobs.get_job(session, job_id).adapter_id


def messages(sessions, job_id: str) -> list[str]:
    with sessions() as session:
        return [e.data["message"] for e in jobs.list_events(session, job_id) if e.kind == "message"]


def improving_steps(sessions, job_id: str) -> list[int]:
    """The steps whose evaluation beat every earlier one, as training ranks them: (accuracy, -loss)."""
    with sessions() as session:
        evals = [e for e in jobs.list_events(session, job_id) if e.kind == "eval"]
    best, steps = (float("-inf"), float("-inf")), []
    for event in evals:
        if (event.data["accuracy"], -event.data["loss"]) > best:
            best = (event.data["accuracy"], -event.data["loss"])
            steps.append(event.step)
    return steps


def upkeep(settings, sessions) -> JobUpkeep:
    return JobUpkeep(sessions=sessions, storage=make_storage(settings, sessions), send=lambda job_id: None,
                     stale_after=timedelta(seconds=1), resend_after=timedelta(hours=1), max_attempts=2)


def test_each_better_evaluation_stores_a_checkpoint_adapter_and_the_ended_job_keeps_the_last_three_and_the_best(
        env, tiny_base):
    settings, sessions = env
    job_id = queue_job(settings, sessions, max_steps=10, eval_every=1, early_stopping_patience=10)
    assert run_job(job_id, settings=settings, sessions=sessions, base=tiny_base) == "succeeded"
    stored = [m for m in messages(sessions, job_id) if m.startswith("checkpoint ")]
    improving = improving_steps(sessions, job_id)
    assert [int(m.rsplit(" ", 1)[1]) for m in stored] == improving and len(improving) > 4  # so some were pruned
    with sessions() as session:
        kept = jobs.list_checkpoints(session, job_id)
        assert [c.step for c in kept] == improving[::-1][:3]  # newest first; the best is the newest here
        for checkpoint in kept:
            adapter = registry.get_adapter(session, checkpoint.adapter_id)
            assert checkpoint.id == f"ftckpt-{adapter.id}" and adapter.source == "checkpoint"
            assert adapter.name == f"tiny-job-step-{checkpoint.step}" and adapter.template == "{input} =>"
            assert checkpoint.metrics["step"] == checkpoint.step and checkpoint.metrics["train_loss"] > 0
            assert adapter.metrics["job_id"] == job_id
        pruned = [m.split()[1] for m in stored[:-3]]
        assert all(registry.get_adapter(session, adapter_id) is None for adapter_id in pruned)
    for adapter_id in pruned:  # their files went with their rows
        with pytest.raises(NotStored):
            served(settings, sessions, adapter_id)
    # The best checkpoint holds the prompt the job's own adapter holds: the best evaluated.
    final = final_adapter(sessions, job_id)
    assert torch.equal(served(settings, sessions, kept[0].adapter_id), served(settings, sessions, final))


def add_checkpoints(settings, sessions, tiny_base, job_id: str, token: str, accuracies: list[float]) -> list[str]:
    """Checkpoints at steps 1..n with these accuracies, as a run stores them."""
    storage, ids = make_storage(settings, sessions), []
    for step, accuracy in enumerate(accuracies, start=1):
        adapter, files = registry.new_adapter(name=f"c{step}", prompt_embeddings=torch.randn(4, tiny_base.hidden_size),
                                              base_fingerprint=tiny_base.fingerprint, base_model_name=tiny_base.name,
                                              source="checkpoint")
        with sessions() as session, storage.storing(session, adapter_key(adapter.id), files):
            assert jobs.add_checkpoint(session, job_id, token, adapter, step,
                                       {"eval_accuracy": accuracy, "eval_loss": 1.0})
        ids.append(adapter.id)
    return ids


def test_pruning_waits_for_the_end_and_keeps_the_last_three_and_the_best(env, tiny_base):
    settings, sessions = env
    job_id = queue_job(settings, sessions)
    with sessions() as session:
        token = jobs.claim(session, job_id, "w")
    ids = add_checkpoints(settings, sessions, tiny_base, job_id, token, [0.9, 0.1, 0.2, 0.3, 0.4, 0.5])
    with sessions() as session:  # a second store at a step the job has: refused, nothing added
        assert not jobs.add_checkpoint(session, job_id, token, registry.new_adapter(
            name="again", prompt_embeddings=torch.zeros(4, tiny_base.hidden_size), base_fingerprint="f",
            base_model_name="m", source="checkpoint")[0], 6, {})
    chores = upkeep(settings, sessions)
    with sessions() as session:
        assert checkpoints.prune(session, chores.storage, job_id) == []  # still running: all stay
        assert jobs.pause_run(session, job_id, token, 6)
    assert chores.prune_ended_checkpoints() == []  # paused has not ended
    with sessions() as session:
        assert jobs.cancel(session, job_id) == "cancelled"
    assert sorted(chores.prune_ended_checkpoints()) == sorted(ids[1:3])  # steps 2 and 3
    with sessions() as session:
        assert [c.step for c in jobs.list_checkpoints(session, job_id)] == [6, 5, 4, 1]
        assert registry.get_adapter(session, ids[1]) is None
        # Listed with their job, not among the adapters unless asked.
        assert registry.list_adapters(session)[1] == 0 and registry.list_adapters(session, include_checkpoints=True)[1] == 4
    assert chores.prune_ended_checkpoints() == []


def test_pruning_keeps_a_checkpoint_a_job_not_ended_starts_from(env, tiny_base):
    settings, sessions = env
    job_id = queue_job(settings, sessions)
    with sessions() as session:
        token = jobs.claim(session, job_id, "w")
    ids = add_checkpoints(settings, sessions, tiny_base, job_id, token, [0.9, 0.1, 0.2, 0.3, 0.4])
    queue_job(settings, sessions, "next")
    with sessions() as session:  # a job that will warm-start from the step-2 checkpoint
        session.execute(update(TrainJob).where(TrainJob.id == "next").values(base_adapter_id=ids[1]))
        session.commit()
        assert jobs.finish(session, job_id, token, JobStatus.FAILED, message="failed")
    chores = upkeep(settings, sessions)
    assert chores.prune_ended_checkpoints() == []  # step 2 is needed; no other is beyond the last three and the best
    with sessions() as session:
        assert [c.step for c in jobs.list_checkpoints(session, job_id)] == [5, 4, 3, 2, 1]
        assert jobs.request_pause(session, "next") == "paused"  # paused: still to start from it
    assert chores.prune_ended_checkpoints() == []
    with sessions() as session:
        assert jobs.cancel(session, "next") == "cancelled"
    assert chores.prune_ended_checkpoints() == [ids[1]]


def test_a_run_writes_no_checkpoint_once_it_has_lost_its_job(env, tiny_base):
    settings, sessions = env
    job_id = queue_job(settings, sessions)
    with sessions() as session:
        token = jobs.claim(session, job_id, "w")
        session.execute(update(TrainJob).values(run_token="another run's"))
        session.commit()
    with pytest.raises(jobs.StaleRun):
        add_checkpoints(settings, sessions, tiny_base, job_id, token, [0.5])
    with sessions() as session:
        assert jobs.list_checkpoints(session, job_id) == [] and registry.list_adapters(session)[1] == 0


def test_a_job_warm_starts_from_an_adapter(env, tiny_base):
    settings, sessions = env
    first = queue_job(settings, sessions, "first")
    assert run_job(first, settings=settings, sessions=sessions, base=tiny_base) == "succeeded"
    start = final_adapter(sessions, first)
    # A learning rate too small to move it: the second job's prompt stays where it started.
    second = queue_job(settings, sessions, "second", learning_rate=1e-9, init="random", seed=7)
    cold = queue_job(settings, sessions, "cold", learning_rate=1e-9, init="random", seed=7)
    with sessions() as session:
        jobs.get_job(session, second).base_adapter_id = start
        session.commit()
    for job_id in (second, cold):
        assert run_job(job_id, settings=settings, sessions=sessions, base=tiny_base) == "succeeded"
    assert f"starting from adapter {start}" in messages(sessions, second)
    warm = served(settings, sessions, final_adapter(sessions, second))
    torch.testing.assert_close(warm, served(settings, sessions, start), atol=1e-5, rtol=0)
    assert not torch.allclose(served(settings, sessions, final_adapter(sessions, cold)), warm, atol=1e-2)


def test_a_prefix_job_warm_starts_from_a_prefix_adapter(env, tiny_base):
    settings, sessions = env
    first = queue_job(settings, sessions, "first", method="prefix_tuning")
    assert run_job(first, settings=settings, sessions=sessions, base=tiny_base) == "succeeded"
    second = queue_job(settings, sessions, "second", method="prefix_tuning", learning_rate=1e-9, init="random")
    with sessions() as session:
        jobs.get_job(session, second).base_adapter_id = final_adapter(sessions, first)
        session.commit()
    assert run_job(second, settings=settings, sessions=sessions, base=tiny_base) == "succeeded"
    torch.testing.assert_close(served(settings, sessions, final_adapter(sessions, second)),
                               served(settings, sessions, final_adapter(sessions, first)), atol=1e-5, rtol=0)


def test_warm_start_problems_are_named_and_fail_the_run(env, tiny_base):
    settings, sessions = env
    first = queue_job(settings, sessions, "first")
    assert run_job(first, settings=settings, sessions=sessions, base=tiny_base) == "succeeded"
    adapter_id, storage = final_adapter(sessions, first), make_storage(settings, sessions)
    with sessions() as session:
        def problem(adapter=adapter_id, method="prompt_tuning", n=4, projection=False):
            return warm_start_problem(session, storage, tiny_base, adapter, method, n, projection)

        assert problem() is None
        assert problem(n=8) == f"adapter {adapter_id} has 4 virtual tokens; the job asks for 8"
        assert problem(method="prefix_tuning") == f"adapter {adapter_id} is prompt_tuning; the job asks for prefix_tuning"
        assert "prefix_projection must be off" in problem(projection=True)
        assert problem("nope") == "adapter 'nope' to start from does not exist"
        registry.get_adapter(session, adapter_id).base_fingerprint = "other-model@0"
        assert problem() == (f"adapter {adapter_id} was made for base model other-model@0; "
                             f"this server runs {tiny_base.fingerprint}")
        session.rollback()
    # At run time too: the job asks for another size than the adapter has.
    second = queue_job(settings, sessions, "second", num_virtual_tokens=8)
    with sessions() as session:
        jobs.get_job(session, second).base_adapter_id = adapter_id
        session.commit()
    assert run_job(second, settings=settings, sessions=sessions, base=tiny_base) == "failed"
    with sessions() as session:
        job = jobs.get_job(session, second)
    assert job.error_code == "warm_start" and job.error_message == (
        f"cannot warm-start: adapter {adapter_id} has 4 virtual tokens; the job asks for 8")


def test_a_queued_job_pauses_at_once_is_skipped_by_its_delivery_and_can_be_cancelled(env, tiny_base):
    settings, sessions = env
    job_id = queue_job(settings, sessions)
    with sessions() as session:
        assert jobs.request_pause(session, job_id) == "paused"
        assert not jobs.resume(session, "nope")
    assert run_job(job_id, settings=settings, sessions=sessions, base=tiny_base) == "skipped"
    with sessions() as session:
        assert jobs.cancel(session, job_id) == "cancelled"
        assert jobs.request_pause(session, job_id) == "cancelled" and not jobs.resume(session, job_id)
    assert messages(sessions, job_id)[-2:] == ["paused while queued", "cancelled while paused"]


@pytest.fixture
def slow_steps(monkeypatch):
    """Steps of the tiny model take ~1 ms: slow them so that a pause lands mid-run."""
    record_step = jobs.record_step

    def slowly(*args, **kwargs):
        time.sleep(0.03)
        record_step(*args, **kwargs)

    monkeypatch.setattr(jobs, "record_step", slowly)


def test_a_paused_job_resumed_by_a_fresh_run_ends_as_an_uninterrupted_run(env, tiny_base, slow_steps):
    """Same seed, paused midway and resumed by another run (as another node would): the same
    final prompt, checkpoints and metrics as the run without the pause. Runs on the inline device,
    where a step's batch is one work item: a serving node sizes micro-batches by timing, which
    changes only the float summation order of a step's gradient."""
    settings, sessions = env
    config = dict(max_steps=40, eval_every=7, batch_size=3, early_stopping_patience=10, learning_rate=0.1)
    whole, paused = queue_job(settings, sessions, "whole", **config), queue_job(settings, sessions, "paused", **config)
    assert run_job(whole, settings=settings, sessions=sessions, base=tiny_base) == "succeeded"
    with sessions() as session:  # asked before it starts: the run stops at the first boundary after its first heartbeat
        session.execute(update(TrainJob).where(TrainJob.id == paused).values(pause_requested=True))
        session.commit()
    assert run_job(paused, settings=settings, sessions=sessions, base=tiny_base) == "paused"
    storage = make_storage(settings, sessions)
    with sessions() as session:
        job = jobs.get_job(session, paused)
        assert (job.status, job.run_token, job.worker, job.pause_requested, job.attempts) == ("paused", None, None, False, 0)
        at = job.step
    assert 0 < at < 40 and messages(sessions, paused)[-1] == f"paused at step {at}"
    assert f"{TRAIN_STATES}/{paused}-{at:09d}" in storage.keys(TRAIN_STATES)  # saved at the pause, not only at evaluations
    assert run_job(paused, settings=settings, sessions=sessions, base=tiny_base) == "skipped"  # paused: no run takes it

    with sessions() as session:
        assert jobs.resume(session, paused)
    assert run_job(paused, settings=settings, sessions=sessions, base=tiny_base) == "succeeded"
    assert {"resumed", f"going on from step {at}, as saved"} <= set(messages(sessions, paused))
    torch.testing.assert_close(served(settings, sessions, final_adapter(sessions, paused)),
                               served(settings, sessions, final_adapter(sessions, whole)), atol=1e-6, rtol=0)
    with sessions() as session:
        a, b = jobs.get_job(session, paused), jobs.get_job(session, whole)
        assert (a.eval_loss, a.eval_accuracy, a.step) == pytest.approx((b.eval_loss, b.eval_accuracy, b.step))
        assert [c.step for c in jobs.list_checkpoints(session, paused)] == [c.step for c in jobs.list_checkpoints(session, whole)]


def test_a_pause_whose_state_cannot_be_stored_does_not_pause_the_job(env, tiny_base, slow_steps, monkeypatch):
    """Paused, the job's state must be in storage for any node to go on from: without it the run
    goes on, the pause dropped with a warning."""
    settings, sessions = env
    job_id = queue_job(settings, sessions, max_steps=20, eval_every=100)

    def broken(state):
        raise OSError("storage is down")

    monkeypatch.setattr(train_state, "encode", broken)
    with sessions() as session:
        session.execute(update(TrainJob).values(pause_requested=True))
        session.commit()
    assert run_job(job_id, settings=settings, sessions=sessions, base=tiny_base) == "succeeded"
    with sessions() as session:
        job = jobs.get_job(session, job_id)
        assert (job.step, job.pause_requested) == (20, False)
        warnings = [e.data for e in jobs.list_events(session, job_id) if e.data.get("level") == "warn"]
    assert warnings and warnings[0]["message"].startswith("could not pause at step ")
    assert not any(m.startswith("paused") for m in messages(sessions, job_id))


def test_pause_and_cancel_asked_of_a_running_job_cancel_it(env, tiny_base):
    settings, sessions = env
    job_id = queue_job(settings, sessions, max_steps=100_000, eval_every=100_000)
    with sessions() as session:
        session.execute(update(TrainJob).values(pause_requested=True, cancel_requested=True))
        session.commit()
    assert run_job(job_id, settings=settings, sessions=sessions, base=tiny_base) == "cancelled"
    with sessions() as session:  # an ended job has no pause pending
        assert not jobs.get_job(session, job_id).pause_requested


def test_a_job_reaped_as_failed_has_no_pause_pending(env):
    settings, sessions = env
    job_id = queue_job(settings, sessions)
    with sessions() as session:
        jobs.claim(session, job_id, "w")
        assert jobs.request_pause(session, job_id) == "running"
        session.execute(update(TrainJob).values(heartbeat_at=utcnow() - timedelta(hours=1)))
        session.commit()
        assert jobs.reap_stale(session, stale_after=timedelta(seconds=1), max_attempts=1) == []
        job = jobs.get_job(session, job_id)
        assert (job.status, job.pause_requested) == ("failed", False)


def test_upkeep_leaves_a_paused_job_and_its_files_alone(env, tiny_base, slow_steps):
    settings, sessions = env
    job_id = queue_job(settings, sessions, max_steps=100, eval_every=100)
    with sessions() as session:
        session.execute(update(TrainJob).values(pause_requested=True))
        session.commit()
    assert run_job(job_id, settings=settings, sessions=sessions, base=tiny_base) == "paused"
    with sessions() as session:  # long after its last heartbeat, as if every node had died meanwhile
        session.execute(update(TrainJob).values(heartbeat_at=utcnow() - timedelta(hours=1)))
        session.commit()
    chores = upkeep(settings, sessions)
    assert chores.reap_stale_jobs() == [] and chores.send_unsent_jobs() == [] and chores.delete_ended_job_files() == []
    assert chores.prune_ended_checkpoints() == []
    with sessions() as session:
        assert jobs.get_job(session, job_id).status == "paused"
    keys = chores.storage.keys(DATASETS) + chores.storage.keys(TRAIN_STATES)
    assert f"{DATASETS}/{job_id}" in keys and any(key.startswith(f"{TRAIN_STATES}/{job_id}-") for key in keys)
    with sessions() as session:  # resumed, it is queued like any job and needs a message
        assert jobs.resume(session, job_id)
        assert jobs.unsent(session, unsent_after=timedelta(0), resend_after=timedelta(hours=1)) == [job_id]


def test_a_pause_asked_of_a_run_that_gave_its_job_back_pauses_it_once(env):
    settings, sessions = env
    job_id = queue_job(settings, sessions)
    with sessions() as session:  # as a released run leaves it: queued, its pause still asked
        session.execute(update(TrainJob).values(pause_requested=True))
        session.commit()
        assert jobs.request_pause(session, job_id) == "paused" and jobs.resume(session, job_id)
        assert not jobs.get_job(session, job_id).pause_requested  # the next run is not paused again
