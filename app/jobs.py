"""Training jobs in the registry: create, claim, progress, finish, cancel, reap.

The database is the source of truth for job state. Every state change is a conditional
update (`WHERE status = <expected>`), so two workers, a duplicate delivery or a racing cancel
can never both win.
"""

from datetime import datetime, timedelta

from sqlalchemy import func, select, update
from sqlalchemy.orm import Session

from app.db import get_by_id, paginate
from app.models import JobEvent, TrainJob, utcnow

TERMINAL = ("succeeded", "failed", "cancelled")
STATUSES = ("queued", "running", *TERMINAL)


def create_job(session: Session, *, job_id: str, name: str, params: dict, dataset_path: str,
               train_examples: int, validation_examples: int) -> TrainJob:
    job = TrainJob(id=job_id, name=name, params=params, dataset_path=dataset_path, status="queued",
                   train_examples=train_examples, validation_examples=validation_examples)
    session.add(job)
    session.flush()  # the job row first: events reference it
    add_event(session, job_id, "message", message="queued")
    session.commit()
    return job


def get_job(session: Session, job_id: str) -> TrainJob | None:
    return get_by_id(session, TrainJob, job_id)


def list_jobs(session: Session, *, status: str | None = None, limit: int = 20, offset: int = 0) -> tuple[list[TrainJob], int]:
    query = select(TrainJob)
    if status:
        query = query.where(TrainJob.status == status)
    return paginate(session, query, TrainJob.created_at.desc(), TrainJob.id, limit=limit, offset=offset)


def count_by_status(session: Session) -> dict[str, int]:
    return dict(session.execute(select(TrainJob.status, func.count()).group_by(TrainJob.status)).all())


def job_for_adapter(session: Session, adapter_id: str) -> TrainJob | None:
    """The job that trained this adapter, if it was trained here."""
    return session.scalars(select(TrainJob).where(TrainJob.adapter_id == adapter_id).limit(1)).first()


def list_events(session: Session, job_id: str, *, after_id: int = 0, limit: int = 1000) -> list[JobEvent]:
    query = select(JobEvent).where(JobEvent.job_id == job_id, JobEvent.id > after_id).order_by(JobEvent.id).limit(limit)
    return list(session.scalars(query))


def _transition(session: Session, job_id: str, expected: str, **values) -> bool:
    result = session.execute(
        update(TrainJob).where(TrainJob.id == job_id, TrainJob.status == expected).values(**values)
    )
    return result.rowcount == 1


def add_event(session: Session, job_id: str, kind: str, step: int = 0, **data) -> None:
    session.add(JobEvent(job_id=job_id, kind=kind, step=step, data=data))


def claim(session: Session, job_id: str, worker: str) -> bool:
    """queued -> running. False when someone else has it, or it was cancelled or finished."""
    now = utcnow()
    won = _transition(session, job_id, "queued", status="running", worker=worker, started_at=now,
                      heartbeat_at=now, attempts=TrainJob.attempts + 1)
    if won:
        add_event(session, job_id, "message", message=f"started on {worker}")
    session.commit()
    return won


def heartbeat(session: Session, job_id: str) -> bool:
    """Refresh the heartbeat; return whether a cancel was requested."""
    session.execute(update(TrainJob).where(TrainJob.id == job_id, TrainJob.status == "running").values(heartbeat_at=utcnow()))
    session.commit()
    return bool(session.scalar(select(TrainJob.cancel_requested).where(TrainJob.id == job_id)))


def record_step(session: Session, job_id: str, step: int, total: int, epoch: float, loss: float) -> None:
    session.execute(update(TrainJob).where(TrainJob.id == job_id, TrainJob.status == "running").values(
        step=step, total_steps=total, epoch=epoch, train_loss=loss, heartbeat_at=utcnow()))
    add_event(session, job_id, "train", step, loss=loss, epoch=epoch)
    session.commit()


def record_eval(session: Session, job_id: str, step: int, loss: float, accuracy: float) -> None:
    session.execute(update(TrainJob).where(TrainJob.id == job_id).values(eval_loss=loss, eval_accuracy=accuracy))
    add_event(session, job_id, "eval", step, loss=loss, accuracy=accuracy)
    session.commit()


def finish(session: Session, job_id: str, status: str, *, message: str, adapter_id: str | None = None,
           error_code: str | None = None, eval_loss: float | None = None, eval_accuracy: float | None = None) -> bool:
    """running -> succeeded | failed | cancelled."""
    values = dict(status=status, finished_at=utcnow(), adapter_id=adapter_id, error_code=error_code,
                  error_message=message if status == "failed" else None)
    if eval_loss is not None:  # the kept (best) prompt's figures, not the last evaluation's
        values |= dict(eval_loss=eval_loss, eval_accuracy=eval_accuracy)
    done = _transition(session, job_id, "running", **values)
    if done:
        add_event(session, job_id, "message", message=message)
    session.commit()
    return done


def cancel(session: Session, job_id: str) -> str:
    """Cancel at once if queued; ask a running job to stop. Returns the resulting status."""
    if _transition(session, job_id, "queued", status="cancelled", finished_at=utcnow()):
        add_event(session, job_id, "message", message="cancelled before it started")
        session.commit()
        return "cancelled"
    if session.execute(update(TrainJob).where(TrainJob.id == job_id, TrainJob.status == "running")
                       .values(cancel_requested=True)).rowcount:
        add_event(session, job_id, "message", message="cancel requested")
    session.commit()
    return session.scalar(select(TrainJob.status).where(TrainJob.id == job_id))


def reap_stale(session: Session, *, stale_after: timedelta, max_attempts: int) -> list[str]:
    """Jobs whose worker stopped heartbeating: requeue once more (returned, for re-dispatch)
    or fail them with the reason. Never leaves a job `running` forever."""
    cutoff: datetime = utcnow() - stale_after
    stale = session.scalars(select(TrainJob).where(TrainJob.status == "running", TrainJob.heartbeat_at < cutoff)).all()
    requeued = []
    for job in stale:
        if job.attempts < max_attempts and not job.cancel_requested:
            if _transition(session, job.id, "running", status="queued", worker=None):
                add_event(session, job.id, "message", message=f"worker {job.worker} stopped responding; retrying")
                requeued.append(job.id)
        else:
            reason = "cancelled; its worker stopped responding" if job.cancel_requested else (
                f"worker {job.worker} stopped responding (attempt {job.attempts} of {max_attempts})")
            status = "cancelled" if job.cancel_requested else "failed"
            if _transition(session, job.id, "running", status=status, finished_at=utcnow(), error_code=None
                           if job.cancel_requested else "worker_lost", error_message=None if job.cancel_requested else reason):
                add_event(session, job.id, "message", message=reason)
    session.commit()
    return requeued
