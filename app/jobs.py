"""Training jobs in the registry: create, claim, progress, checkpoints, finish, pause, resume, cancel, reap.

The database is the source of truth for job state. Every state change is a conditional
update (`WHERE status = <expected>`), so two workers, a duplicate delivery or a racing cancel
can never both win.

Each claim is a run with a fresh token (fencing): everything a run writes (heartbeat, progress,
events, finish and its adapter) is conditional on the job still running under that token. A run
whose worker stalled past the stale timeout, so that the job was requeued and maybe claimed again,
gets StaleRun or False and writes nothing.
"""

import secrets
import threading
from collections.abc import Collection, Iterator
from contextlib import contextmanager
from datetime import datetime, timedelta
from typing import cast

from sqlalchemy import CursorResult, Update, and_, func, or_, select, update
from sqlalchemy.orm import Session

from app import webhooks
from app.db import get_by_id, paginate
from app.job_status import TERMINAL, JobStatus
from app.models import ERROR_MESSAGE_MAX, Adapter, JobCheckpoint, JobEvent, TrainJob, utcnow

STATUSES = tuple(JobStatus)


class StaleRun(Exception):
    """The run no longer holds its job: the job was requeued, claimed by another run, or ended."""


class LiveRuns:
    """The jobs this process is running now. Its reaper leaves them be, whatever their heartbeats
    say: a process that was paused (SIGSTOP, a frozen VM) stopped its heartbeats and its reaper
    alike, and the reaper may wake first."""

    def __init__(self) -> None:
        self._jobs: set[str] = set()
        self._lock = threading.Lock()

    @contextmanager
    def running(self, job_id: str) -> Iterator[None]:
        with self._lock:
            self._jobs.add(job_id)
        try:
            yield
        finally:
            with self._lock:
                self._jobs.discard(job_id)

    def snapshot(self) -> frozenset[str]:
        with self._lock:
            return frozenset(self._jobs)


live_runs = LiveRuns()  # one per process: every run in it, whichever node object started it


def create_job(session: Session, *, job_id: str, name: str, params: dict, dataset_path: str,
               train_examples: int, validation_examples: int, **fields: object) -> TrainJob:
    """A queued job; `fields`: more of its columns (the OpenAI API's suffix, files, metadata...)."""
    job = TrainJob(id=job_id, name=name, params=params, dataset_path=dataset_path, status=JobStatus.QUEUED,
                   train_examples=train_examples, validation_examples=validation_examples, **fields)
    session.add(job)
    session.flush()  # the job row first: events reference it
    add_event(session, job_id, "message", message="queued")
    session.commit()
    return job


def get_job(session: Session, job_id: str) -> TrainJob | None:
    return get_by_id(session, TrainJob, job_id)


def list_jobs(session: Session, *, status: JobStatus | None = None, limit: int = 20,
              offset: int = 0) -> tuple[list[TrainJob], int]:
    query = select(TrainJob)
    if status:
        query = query.where(TrainJob.status == status)
    return paginate(session, query, TrainJob.created_at.desc(), TrainJob.id, limit=limit, offset=offset)


def list_jobs_after(session: Session, *, after: TrainJob | None, limit: int) -> list[TrainJob]:
    """Up to `limit` jobs, newest first (ties by id), only those past the `after` cursor if given."""
    query = select(TrainJob)
    if after is not None:
        query = query.where(or_(TrainJob.created_at < after.created_at,
                                and_(TrainJob.created_at == after.created_at, TrainJob.id < after.id)))
    return list(session.scalars(query.order_by(TrainJob.created_at.desc(), TrainJob.id.desc()).limit(limit)))


def count_by_status(session: Session) -> dict[str, int]:
    return dict(session.execute(select(TrainJob.status, func.count()).group_by(TrainJob.status)).all())


def job_for_adapter(session: Session, adapter_id: str) -> TrainJob | None:
    """The job that trained this adapter, if it was trained here."""
    return session.scalars(select(TrainJob).where(TrainJob.adapter_id == adapter_id).limit(1)).first()


def list_events(session: Session, job_id: str, *, after_id: int = 0, limit: int = 1000) -> list[JobEvent]:
    query = select(JobEvent).where(JobEvent.job_id == job_id, JobEvent.id > after_id).order_by(JobEvent.id).limit(limit)
    return list(session.scalars(query))


def list_events_newest_first(session: Session, job_id: str, *, before_id: int | None = None,
                             limit: int = 20) -> list[JobEvent]:
    """Up to `limit` of the job's events, newest first, only those older than `before_id` if given."""
    query = select(JobEvent).where(JobEvent.job_id == job_id)
    if before_id is not None:
        query = query.where(JobEvent.id < before_id)
    return list(session.scalars(query.order_by(JobEvent.id.desc()).limit(limit)))


def _rows_updated(session: Session, statement: Update) -> int:
    """How many rows an UPDATE changed (what the guarded transitions below compare against)."""
    return cast(CursorResult, session.execute(statement)).rowcount


def _transition(session: Session, job_id: str, expected: JobStatus, **values) -> bool:
    return _rows_updated(session, update(TrainJob).where(
        TrainJob.id == job_id, TrainJob.status == expected).values(**values)) == 1


def add_event(session: Session, job_id: str, kind: str, step: int = 0, **data) -> None:
    session.add(JobEvent(job_id=job_id, kind=kind, step=step, data=data))


def claim(session: Session, job_id: str, worker: str) -> str | None:
    """queued -> running as a new run. Returns the run's token, or None when someone else has
    the job, or it was cancelled or finished."""
    now, token = utcnow(), secrets.token_hex(16)
    won = _transition(session, job_id, JobStatus.QUEUED, status=JobStatus.RUNNING, run_token=token, worker=worker,
                      started_at=now, heartbeat_at=now, attempts=TrainJob.attempts + 1)
    if won:
        add_event(session, job_id, "message", message=f"started on {worker}")
    session.commit()
    return token if won else None


def _update_run(session: Session, job_id: str, token: str, **values) -> None:
    """Update the job only while this run holds it; otherwise roll back and raise StaleRun."""
    if _rows_updated(session, update(TrainJob).where(
            TrainJob.id == job_id, TrainJob.run_token == token, TrainJob.status == JobStatus.RUNNING).values(**values)) != 1:
        session.rollback()
        raise StaleRun(job_id)


def heartbeat(session: Session, job_id: str, token: str) -> bool:
    """Refresh the run's heartbeat; return whether a cancel was requested."""
    _update_run(session, job_id, token, heartbeat_at=utcnow())
    session.commit()
    return bool(session.scalar(select(TrainJob.cancel_requested).where(TrainJob.id == job_id)))


def pause_requested(session: Session, job_id: str) -> bool:
    return bool(session.scalar(select(TrainJob.pause_requested).where(TrainJob.id == job_id)))


def record_step(session: Session, job_id: str, token: str, step: int, total: int, epoch: float, loss: float) -> None:
    _update_run(session, job_id, token, step=step, total_steps=total, epoch=epoch, train_loss=loss, heartbeat_at=utcnow())
    add_event(session, job_id, "train", step, loss=loss, epoch=epoch)
    session.commit()


def record_eval(session: Session, job_id: str, token: str, step: int, loss: float, accuracy: float) -> None:
    _update_run(session, job_id, token, eval_loss=loss, eval_accuracy=accuracy)
    add_event(session, job_id, "eval", step, loss=loss, accuracy=accuracy)
    session.commit()


def hold(session: Session, job_id: str, token: str) -> None:
    """Check, in the caller's transaction, that the run still holds its job (StaleRun if not), so
    that what the transaction writes is the run's to write."""
    _update_run(session, job_id, token, heartbeat_at=utcnow())


def note(session: Session, job_id: str, token: str, message: str) -> None:
    """A message on the job's events, from the run that holds it."""
    hold(session, job_id, token)
    add_event(session, job_id, "message", message=message)
    session.commit()


def checkpoint_id(adapter_id: str) -> str:
    return f"ftckpt-{adapter_id}"


def add_checkpoint(session: Session, job_id: str, token: str, adapter: Adapter, step: int, metrics: dict) -> bool:
    """The run's checkpoint at `step`: its adapter row and the checkpoint, in the caller's
    transaction (the adapter's files stored with it: app.storage), committed only while the run
    holds the job (StaleRun otherwise). False, and nothing added, when the job has one at that
    step already (a run that went on from an earlier saved state evaluates that step again, alike)."""
    hold(session, job_id, token)
    if session.scalar(select(JobCheckpoint.id).where(JobCheckpoint.job_id == job_id, JobCheckpoint.step == step)):
        session.rollback()
        return False
    session.add(adapter)
    session.add(JobCheckpoint(id=checkpoint_id(adapter.id), job_id=job_id, adapter_id=adapter.id, step=step,
                              metrics=metrics))
    add_event(session, job_id, "message", step, message=f"checkpoint {adapter.id} stored at step {step}")
    session.commit()
    return True


def _warm_start_adapters():
    """The adapters that jobs not yet ended (queued, running or paused) will start from."""
    return select(TrainJob.base_adapter_id).where(TrainJob.base_adapter_id.is_not(None), TrainJob.status.not_in(TERMINAL))


def job_starting_from(session: Session, adapter_id: str) -> str | None:
    """A job not yet ended that will start from this adapter, if any."""
    return session.scalars(select(TrainJob.id).where(TrainJob.base_adapter_id == adapter_id,
                                                     TrainJob.status.not_in(TERMINAL)).order_by(TrainJob.id).limit(1)).first()


def list_checkpoints(session: Session, job_id: str) -> list[JobCheckpoint]:
    """The job's checkpoints whose adapter still exists, newest first."""
    query = (select(JobCheckpoint).join(Adapter, Adapter.id == JobCheckpoint.adapter_id)
             .where(JobCheckpoint.job_id == job_id).order_by(JobCheckpoint.step.desc()))
    return list(session.scalars(query))


def _score(checkpoint: JobCheckpoint) -> tuple[float, float]:
    """(accuracy, -loss): higher is better, as training ranks its evaluations."""
    return (checkpoint.metrics.get("eval_accuracy") or 0.0, -(checkpoint.metrics.get("eval_loss") or 0.0))


def prunable_checkpoints(session: Session, job_id: str, keep_last: int) -> list[JobCheckpoint]:
    """An ended job's checkpoints beyond its last `keep_last` and its best; none while it may still
    run. A checkpoint that a job not yet ended will start from stays too (job upkeep looks again later)."""
    if session.scalar(select(TrainJob.status).where(TrainJob.id == job_id)) not in TERMINAL:
        return []
    checkpoints = list(session.scalars(select(JobCheckpoint).where(JobCheckpoint.job_id == job_id)
                                       .order_by(JobCheckpoint.step.desc())))
    if not checkpoints:
        return []
    kept = {c.id for c in checkpoints[:keep_last]} | {max(checkpoints, key=_score).id}
    needed = set(session.scalars(_warm_start_adapters().where(
        TrainJob.base_adapter_id.in_([c.adapter_id for c in checkpoints]))))
    return [c for c in checkpoints if c.id not in kept and c.adapter_id not in needed]


def ended_jobs_with_checkpoints_over(session: Session, keep_last: int) -> list[str]:
    """Ended jobs with more than `keep_last` checkpoints: maybe some to prune."""
    query = (select(JobCheckpoint.job_id).join(TrainJob, TrainJob.id == JobCheckpoint.job_id)
             .where(TrainJob.status.in_(TERMINAL)).group_by(JobCheckpoint.job_id)
             .having(func.count() > keep_last).order_by(JobCheckpoint.job_id))
    return list(session.scalars(query))


def storable(message: str, limit: int = ERROR_MESSAGE_MAX) -> str:
    """The message as its column can hold it on every backend: no NUL (PostgreSQL refuses it in
    text) and at most `limit` characters, keeping the head (what failed) and the tail (where)."""
    message = message.replace("\x00", "\ufffd")
    if len(message) <= limit:
        return message
    marker = " [...] "
    head = (limit - len(marker)) // 2
    return message[:head] + marker + message[len(message) - (limit - len(marker) - head):]


def finish(session: Session, job_id: str, token: str, status: JobStatus, *, message: str,
           adapter: Adapter | None = None, error_code: str | None = None, eval_loss: float | None = None,
           eval_accuracy: float | None = None) -> bool:
    """The run's end: running -> succeeded | failed | cancelled, with the adapter it made registered
    in the same transaction (its files stored in it too, or written before it: app.storage). False, and nothing written, when
    the run no longer holds the job."""
    message = storable(message)
    values = dict(status=status, finished_at=utcnow(), adapter_id=adapter.id if adapter else None, pause_requested=False,
                  error_code=error_code, error_message=message if status == JobStatus.FAILED else None)
    if eval_loss is not None:  # the kept (best) prompt's figures, not the last evaluation's
        values |= dict(eval_loss=eval_loss, eval_accuracy=eval_accuracy)
    try:
        _update_run(session, job_id, token, **values)
    except StaleRun:
        return False
    if adapter is not None:
        session.add(adapter)
    add_event(session, job_id, "message", message=message)
    webhooks.enqueue_job_event(session, job_id, status)
    session.commit()
    return True


def release(session: Session, job_id: str, token: str, reason: str) -> bool:
    """The run gives its job back unfinished (its node is stopping): queued again at once, with no
    attempt spent and no message in the broker yet (`unsent` lists it). False if the run no longer held it."""
    try:
        _update_run(session, job_id, token, status=JobStatus.QUEUED, worker=None, run_token=None, sent_at=None,
                    attempts=TrainJob.attempts - 1)
    except StaleRun:
        return False
    add_event(session, job_id, "message", message=storable(reason))
    session.commit()
    return True


def _became_paused(session: Session, job_id: str, message: str) -> None:
    """The one place a job becomes paused, in the transaction that pauses it: what a pause
    brings with it (its event; a webhook) goes here."""
    add_event(session, job_id, "message", message=message)
    webhooks.enqueue_job_event(session, job_id, JobStatus.PAUSED)


def pause_run(session: Session, job_id: str, token: str, step: int) -> bool:
    """The run stopped at a pause, its state saved: running -> paused, the job no run's (no
    attempt spent). False, and nothing written, if the run no longer held it."""
    try:
        _update_run(session, job_id, token, status=JobStatus.PAUSED, worker=None, run_token=None, sent_at=None,
                    pause_requested=False, attempts=TrainJob.attempts - 1)
    except StaleRun:
        return False
    _became_paused(session, job_id, f"paused at step {step}")
    session.commit()
    return True


def drop_pause(session: Session, job_id: str, token: str, reason: str) -> None:
    """The run could not pause as asked (its state could not be stored): it goes on, the request
    dropped (asking again tries again), the reason a warning on the job's events. StaleRun if the
    run no longer holds the job."""
    _update_run(session, job_id, token, pause_requested=False)
    add_event(session, job_id, "message", message=storable(reason), level="warn")
    session.commit()


def request_pause(session: Session, job_id: str) -> JobStatus | None:
    """Pause a queued job at once; ask a running one to stop at its next step boundary with its
    state saved (the run then calls pause_run). Returns the resulting status (None: no such job)."""
    if _transition(session, job_id, JobStatus.QUEUED, status=JobStatus.PAUSED, sent_at=None, pause_requested=False):
        _became_paused(session, job_id, "paused while queued")
    elif _rows_updated(session, update(TrainJob).where(
            TrainJob.id == job_id, TrainJob.status == JobStatus.RUNNING, TrainJob.pause_requested.is_(False))
            .values(pause_requested=True)):
        add_event(session, job_id, "message", message="pause requested")
    session.commit()
    status = session.scalar(select(TrainJob.status).where(TrainJob.id == job_id))
    return JobStatus(status) if status else None


def resume(session: Session, job_id: str) -> bool:
    """paused -> queued, with no message in the broker yet: the caller sends one (`unsent` lists
    it otherwise). Whichever node claims it goes on from its saved state. False if it was not paused."""
    if not _transition(session, job_id, JobStatus.PAUSED, status=JobStatus.QUEUED, sent_at=None, pause_requested=False):
        session.rollback()
        return False
    add_event(session, job_id, "message", message="resumed")
    session.commit()
    return True


def cancel(session: Session, job_id: str) -> JobStatus | None:
    """Cancel at once if queued or paused; ask a running job to stop. Returns the resulting status (None: no such job)."""
    for waiting, message in ((JobStatus.QUEUED, "cancelled before it started"), (JobStatus.PAUSED, "cancelled while paused")):
        if _transition(session, job_id, waiting, status=JobStatus.CANCELLED, finished_at=utcnow(), pause_requested=False):
            add_event(session, job_id, "message", message=message)
            webhooks.enqueue_job_event(session, job_id, JobStatus.CANCELLED)
            session.commit()
            return JobStatus.CANCELLED
    if _rows_updated(session, update(TrainJob).where(TrainJob.id == job_id, TrainJob.status == JobStatus.RUNNING)
                     .values(cancel_requested=True)):
        add_event(session, job_id, "message", message="cancel requested")
    session.commit()
    status = session.scalar(select(TrainJob.status).where(TrainJob.id == job_id))
    return JobStatus(status) if status else None


def _reap(session: Session, job_id: str, cutoff: datetime, **values) -> bool:
    """Change a stale running job, unless its run has beaten its heartbeat since it was found stale."""
    return _rows_updated(session, update(TrainJob).where(
        TrainJob.id == job_id, TrainJob.status == JobStatus.RUNNING, TrainJob.heartbeat_at < cutoff).values(**values)) == 1


def reap_stale(session: Session, *, stale_after: timedelta, max_attempts: int,
               alive: Collection[str] = ()) -> list[str]:
    """Jobs whose worker stopped heartbeating: requeue once more (returned; `unsent` then lists
    them for a new message) or fail them with the reason. Never leaves a job `running` forever.
    The stalled run, should it wake, can write nothing more (its token no longer matches). Jobs
    in `alive` are run by the reaper's own process, whose runs it knows to be alive: never reaped."""
    cutoff: datetime = utcnow() - stale_after
    # In id order, so reapers running at once on several nodes lock rows in the same order (no deadlock).
    stale = session.execute(select(TrainJob.id, TrainJob.worker, TrainJob.attempts, TrainJob.cancel_requested)
                            .where(TrainJob.status == JobStatus.RUNNING, TrainJob.heartbeat_at < cutoff,
                                   TrainJob.id.not_in(list(alive)))
                            .order_by(TrainJob.id)).all()
    requeued = []
    for job_id, worker, attempts, cancel_requested in stale:
        if attempts < max_attempts and not cancel_requested:
            if _reap(session, job_id, cutoff, status=JobStatus.QUEUED, worker=None, sent_at=None):
                add_event(session, job_id, "message", message=f"worker {worker} stopped responding; retrying")
                requeued.append(job_id)
        else:
            reason = "cancelled; its worker stopped responding" if cancel_requested else (
                f"worker {worker} stopped responding (attempt {attempts} of {max_attempts})")
            status = JobStatus.CANCELLED if cancel_requested else JobStatus.FAILED
            if _reap(session, job_id, cutoff, status=status, finished_at=utcnow(), pause_requested=False,
                     error_code=None if cancel_requested else "worker_lost",
                     error_message=None if cancel_requested else reason):
                add_event(session, job_id, "message", message=reason)
                webhooks.enqueue_job_event(session, job_id, status)
    session.commit()
    return requeued


def mark_sent(session: Session, job_id: str) -> None:
    """The job's message reached the broker."""
    session.execute(update(TrainJob).where(TrainJob.id == job_id, TrainJob.status == JobStatus.QUEUED)
                    .values(sent_at=utcnow()))
    session.commit()


def unsent(session: Session, *, unsent_after: timedelta, resend_after: timedelta) -> list[str]:
    """Queued jobs that need a message: none reached the broker `unsent_after` after the job was
    made (the broker failed, or the process stopped, between the commit and the send; a requeue
    whose send failed qualifies at once), or the last one was sent `resend_after` ago and no
    worker has claimed the job since (a message the broker lost). A message more than needed is
    harmless: only one delivery can claim the job."""
    now = utcnow()
    never_sent = and_(TrainJob.sent_at.is_(None), TrainJob.created_at < now - unsent_after)
    query = select(TrainJob.id).where(TrainJob.status == JobStatus.QUEUED,
                                      or_(never_sent, TrainJob.sent_at < now - resend_after))
    return list(session.scalars(query.order_by(TrainJob.created_at)))


def ended_datasets(session: Session, dataset_paths: list[str]) -> list[str]:
    """Those of these dataset paths whose job has ended: nothing reads them again."""
    ended = select(TrainJob.dataset_path).where(TrainJob.dataset_path.in_(dataset_paths), TrainJob.status.in_(TERMINAL))
    return list(session.scalars(ended))


def ended_jobs(session: Session, job_ids: Collection[str]) -> set[str]:
    """Those of these jobs that have ended, or are not in the registry at all."""
    ids = list(job_ids)
    known = dict(session.execute(select(TrainJob.id, TrainJob.status).where(TrainJob.id.in_(ids))).all())
    return {job_id for job_id in ids if known.get(job_id, JobStatus.FAILED) in TERMINAL}
