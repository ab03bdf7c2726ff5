"""How a training job reads to clients, with its progress and estimated finish: the body of the
/train-jobs routes, and what the admin pages show. Its own module, so neither router imports the other."""

from app.job_status import JobStatus
from app.models import TrainJob, utcnow
from app.schemas import TrainJobOut


def job_out(job: TrainJob) -> TrainJobOut:
    estimated = None
    if job.status == JobStatus.RUNNING and job.step > 0 and job.started_at:
        elapsed = utcnow() - job.started_at
        estimated = job.started_at + elapsed * (job.total_steps / job.step)
    return TrainJobOut(
        id=job.id, name=job.name, status=job.status,
        progress={"step": job.step, "total_steps": job.total_steps, "epoch": round(job.epoch, 3)},
        train_loss=job.train_loss, eval_loss=job.eval_loss, eval_accuracy=job.eval_accuracy,
        estimated_finish=estimated, adapter_id=job.adapter_id,
        error={"code": job.error_code, "message": job.error_message} if job.error_code else None,
        params=job.params, train_examples=job.train_examples, validation_examples=job.validation_examples,
        attempts=job.attempts, cancel_requested=job.cancel_requested, pause_requested=job.pause_requested,
        created_at=job.created_at, started_at=job.started_at, finished_at=job.finished_at,
    )
