"""Run one training job end to end: claim it, read its dataset from shared storage, train with
progress, heartbeat, cancel and pause, store a checkpoint adapter at each evaluation that improves
the best result, store and register the adapter, finish the job. No Celery here: the consumer only calls run_job.

A run saves its state at each evaluation and at a pause (worker.train_state) in shared storage,
fenced by its token like everything else it writes; a later run of the job (its node was lost,
stopped or paused, or the job was paused and resumed) goes on from the newest saved state instead
of from step 0."""

import logging
import os
import socket
import threading
import time
from enum import StrEnum

from sqlalchemy.orm import Session, sessionmaker

from app import adapter_files, checkpoints, jobs, registry
from app.config import Settings
from app.datasets import from_jsonl
from app.engine.device import Device, InlineDevice
from app.engine.loader import BaseModel
from app.engine.prefix_kv import from_flat
from app.job_status import JobStatus
from app.storage import TRAIN_STATES, Storage, adapter_key, make_storage, train_state_job, train_state_key
from app.train_config import TrainConfig
from app.warm_start import WarmStartError, warm_start_values
from worker import train_state
from worker.train_state import TrainState
from worker.training import Hooks, TrainResult, VirtualTokens, train_adapter

log = logging.getLogger(__name__)


class RunOutcome(StrEnum):
    """How a run of a job ended: with the job's final status, or without ending the job."""

    SUCCEEDED = JobStatus.SUCCEEDED.value
    FAILED = JobStatus.FAILED.value
    CANCELLED = JobStatus.CANCELLED.value
    PAUSED = JobStatus.PAUSED.value  # stopped as asked, its state saved: `resume` queues it again
    SKIPPED = "skipped"  # this delivery did not win the claim
    LOST = "lost"  # the run lost the job midway: its worker stalled and the job went to another run
    RELEASED = "released"  # the node stopped first: the job is queued again for any node

    @property
    def ended_job(self) -> bool:
        return self in (RunOutcome.SUCCEEDED, RunOutcome.FAILED, RunOutcome.CANCELLED)


class _Heartbeat:
    """Background thread: refreshes the run's heartbeat, notices cancel and pause requests, and notices
    when the run has lost its job (then training stops: nothing it would write is accepted).
    Training also stops when the job runs out of time or its node is stopping."""

    def __init__(self, sessions: sessionmaker[Session], job_id: str, token: str, interval: float,
                 time_limit_s: float, node_stopping: threading.Event):
        self.cancel_requested = threading.Event()
        self.pause_requested = threading.Event()
        self.lost = threading.Event()
        self.node_stopping = node_stopping
        self._deadline = time.monotonic() + time_limit_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(sessions, job_id, token, interval), daemon=True)

    def _run(self, sessions, job_id, token, interval):
        while not self._stop.wait(interval):
            try:
                with sessions() as session:
                    if jobs.heartbeat(session, job_id, token):
                        self.cancel_requested.set()
                    if jobs.pause_requested(session, job_id):
                        self.pause_requested.set()
            except jobs.StaleRun:
                self.lost.set()
                return
            except Exception:  # a missed beat is not fatal; the next one may succeed
                log.exception("heartbeat for job %s failed", job_id)

    def out_of_time(self) -> bool:
        return time.monotonic() >= self._deadline

    def should_stop(self) -> bool:
        return (self.cancel_requested.is_set() or self.lost.is_set() or self.node_stopping.is_set()
                or self.out_of_time())

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def _metrics(result: TrainResult) -> dict:
    return {
        "eval_loss": result.eval_loss,
        "eval_accuracy": result.eval_accuracy,
        "train_examples": result.train_examples,
        "eval_examples": result.eval_examples,
        "steps": result.steps,
        "best_step": result.best_step,
        "duration_s": round(result.seconds, 1),
        "stopped_early": result.stopped_early,
    }


def run_job(job_id: str, *, settings: Settings, sessions: sessionmaker[Session], base: BaseModel,
            device: Device = InlineDevice(),
            node_stopping: threading.Event | None = None) -> RunOutcome:
    """Train on `base`, computing through `device`. Returns how the run ended (RunOutcome)."""
    node_stopping = node_stopping or threading.Event()
    with sessions() as session:
        token = jobs.claim(session, job_id, f"{socket.gethostname()}:{os.getpid()}")
        if token is None:
            log.info("job %s not claimable (duplicate delivery, cancelled or finished); skipping", job_id)
            return RunOutcome.SKIPPED
        job = jobs.get_job(session, job_id)
        name, params, dataset_key, base_adapter_id = job.name, dict(job.params), job.dataset_path, job.base_adapter_id
    storage = make_storage(settings, sessions)  # shared: the dataset may have been uploaded to any node
    step_loss: dict[int, float] = {}  # the last step's train loss, for the checkpoint at its evaluation

    def on_step(step, total, epoch, loss):
        step_loss.clear()
        step_loss[step] = loss
        with sessions() as session:
            jobs.record_step(session, job_id, token, step, total, epoch, loss)

    def on_eval(step, loss, accuracy):
        with sessions() as session:
            jobs.record_eval(session, job_id, token, step, loss, accuracy)

    def on_state(state: TrainState) -> bool:
        stored = _save_state(sessions, storage, job_id, token, state)
        if not stored and beat.pause_requested.is_set():  # a pause needs its state stored: none without it
            with sessions() as session:
                jobs.drop_pause(session, job_id, token, f"could not pause at step {state.step}: its state could not "
                                                        "be stored (see the node's log); the job goes on, ask again to pause")
            beat.pause_requested.clear()
        return stored

    def on_best(step: int, prompt: VirtualTokens, loss: float, accuracy: float):
        metrics = {"step": step, "train_loss": step_loss.get(step), "eval_loss": loss, "eval_accuracy": accuracy}
        _store_checkpoint(sessions, storage, base, job_id, token, f"{name[:180]}-step-{step}", config, prompt, metrics)

    def end(status: JobStatus, **fields) -> RunOutcome:
        with sessions() as session:
            if not jobs.finish(session, job_id, token, status, **fields):
                return _lost(job_id)
        _prune_checkpoints(sessions, storage, job_id)
        return RunOutcome(status)

    with _Heartbeat(sessions, job_id, token, settings.heartbeat_interval_s, settings.job_time_limit_s,
                    node_stopping) as beat, jobs.live_runs.running(job_id):
        try:
            dataset = storage.read_all(dataset_key)
            validation = dataset.get("validation.jsonl")
            config = TrainConfig(**params)
            resume, start = _saved_state(storage, job_id), None
            if resume is not None:
                with sessions() as session:
                    jobs.note(session, job_id, token, f"going on from step {resume.step}, as saved")
            elif base_adapter_id is not None:
                start = _warm_start(sessions, storage, base, base_adapter_id, config)
                with sessions() as session:
                    jobs.note(session, job_id, token, f"starting from adapter {base_adapter_id}")
            result = train_adapter(
                base, config, from_jsonl(dataset["train.jsonl"]),
                from_jsonl(validation) if validation is not None else None,
                Hooks(on_step=on_step, on_eval=on_eval, should_cancel=beat.should_stop, on_state=on_state,
                      should_pause=beat.pause_requested.is_set, on_best=on_best), device,
                resume, start,
            )
        except jobs.StaleRun:
            return _lost(job_id)
        except WarmStartError as exc:
            return end(JobStatus.FAILED, message=f"cannot warm-start: {exc}", error_code="warm_start")
        except Exception as exc:
            log.exception("job %s failed", job_id)
            return end(JobStatus.FAILED, message=f"training failed: {type(exc).__name__}: {exc}", error_code="training_error")

    if beat.lost.is_set():
        return _lost(job_id)
    if result.paused and not beat.cancel_requested.is_set():
        with sessions() as session:
            paused = jobs.pause_run(session, job_id, token, result.steps)
        return RunOutcome.PAUSED if paused else _lost(job_id)
    if result.cancelled and not beat.cancel_requested.is_set():
        if beat.out_of_time():
            return end(JobStatus.FAILED, error_code="time_limit",
                       message=f"stopped at step {result.steps}: over the job time limit ({settings.job_time_limit_s} s)")
        with sessions() as session:
            released = jobs.release(session, job_id, token, f"its node stopped at step {result.steps}; queued again")
        return RunOutcome.RELEASED if released else _lost(job_id)
    if result.cancelled or result.paused:  # a pause asked of a job being cancelled: the cancel wins
        return end(JobStatus.CANCELLED, message=f"cancelled at step {result.steps}")
    # The adapter's files are stored with its row, and the row is committed with the job's
    # success, by this run only, or not at all.
    adapter, files = registry.new_adapter(
        name=name, prompt_embeddings=result.learned.peft_tensor(), base_fingerprint=base.fingerprint,
        base_model_name=base.name, source="trained", metrics=_metrics(result), template=params.get("template"),
        original_files=_prefix_files(config, result.learned, base),
    )
    try:
        with sessions() as session, storage.storing(session, adapter_key(adapter.id), files):
            if not jobs.finish(session, job_id, token, JobStatus.SUCCEEDED, adapter=adapter, eval_loss=result.eval_loss,
                               eval_accuracy=result.eval_accuracy,
                               message=f"adapter {adapter.id} registered (eval accuracy {result.eval_accuracy})"):
                raise jobs.StaleRun(job_id)  # nothing was committed: the files go too
    except jobs.StaleRun:
        return _lost(job_id)
    _prune_checkpoints(sessions, storage, job_id)
    return RunOutcome.SUCCEEDED


def _job_states(storage: Storage, job_id: str) -> list[tuple[int, str]]:
    """(step, key) of the job's saved states, oldest first."""
    keys = [key for key in storage.keys(TRAIN_STATES) if train_state_job(key)[0] == job_id]
    return sorted((train_state_job(key)[1], key) for key in keys)


def _saved_state(storage: Storage, job_id: str) -> TrainState | None:
    states = _job_states(storage, job_id)
    return train_state.decode(storage.read_all(states[-1][1])) if states else None


def _save_state(sessions: sessionmaker[Session], storage: Storage, job_id: str, token: str, state: TrainState) -> bool:
    """Store the run's state, only while it holds the job (StaleRun otherwise: nothing stays
    stored), then drop the job's older states; whether it was stored. A save that fails otherwise
    costs only the head start a later run would have had: the run goes on."""
    try:
        with sessions() as session, storage.storing(session, train_state_key(job_id, state.step),
                                                    train_state.encode(state)):
            jobs.hold(session, job_id, token)
            session.commit()
    except jobs.StaleRun:
        raise
    except Exception:
        log.exception("job %s: could not save its state at step %d", job_id, state.step)
        return False
    for step, key in _job_states(storage, job_id):
        if step < state.step:
            storage.delete(key)
    return True


def _prefix_files(config: TrainConfig, learned: VirtualTokens, base: BaseModel) -> dict[str, bytes] | None:
    """A prefix-tuned adapter's files, as PEFT saves a PrefixTuningConfig adapter; None for prompt tuning."""
    if config.method != "prefix_tuning":
        return None
    return adapter_files.encode_prefix_adapter(
        learned.peft_tensor(), base.kv_shape, base.fingerprint, base.name,
        encoder_hidden_size=base.hidden_size if config.prefix_projection else None)


def _warm_start(sessions: sessionmaker[Session], storage: Storage, base: BaseModel, adapter_id: str,
                config: TrainConfig) -> VirtualTokens:
    """The adapter's values to start from, checked against the job again (WarmStartError)."""
    with sessions() as session:
        values = warm_start_values(session, storage, base, adapter_id, config.method, config.num_virtual_tokens,
                                   config.prefix_projection)
    return VirtualTokens(config.method, from_flat(values, base.kv_shape) if config.method == "prefix_tuning" else values)


def _store_checkpoint(sessions: sessionmaker[Session], storage: Storage, base: BaseModel, job_id: str, token: str,
                      name: str, config: TrainConfig, prompt: VirtualTokens, metrics: dict) -> None:
    """A checkpoint adapter of the prompt evaluated at this step, registered with its files only
    while the run holds the job (StaleRun otherwise). One that fails otherwise is logged: the run goes on."""
    learned = prompt.to("cpu")
    adapter, files = registry.new_adapter(
        name=name, prompt_embeddings=learned.peft_tensor(), base_fingerprint=base.fingerprint, base_model_name=base.name,
        source=registry.CHECKPOINT, metrics=metrics | {"job_id": job_id}, template=config.template,
        original_files=_prefix_files(config, learned, base))
    try:
        with sessions() as session, storage.storing(session, adapter_key(adapter.id), files):
            if not jobs.add_checkpoint(session, job_id, token, adapter, metrics["step"], metrics):
                raise _AlreadyStored  # its files go again
    except _AlreadyStored:
        pass
    except jobs.StaleRun:
        raise
    except Exception:
        log.exception("job %s: could not store its checkpoint at step %d", job_id, metrics["step"])


class _AlreadyStored(Exception):
    """The job has a checkpoint at this step already: the files just stored go again."""


def _prune_checkpoints(sessions: sessionmaker[Session], storage: Storage, job_id: str) -> None:
    """Once the job has ended: a failure here is logged, and job upkeep prunes later."""
    try:
        with sessions() as session:
            checkpoints.prune(session, storage, job_id)
    except Exception:
        log.exception("job %s: pruning its checkpoints failed; job upkeep will again", job_id)


def _lost(job_id: str) -> RunOutcome:
    log.warning("job %s is no longer this run's (its heartbeat went stale and the job was requeued or ended); "
                "stopping without writing anything", job_id)
    return RunOutcome.LOST
