"""How a training job reads to clients, with its progress and estimated finish, and its webhook
deliveries: the bodies of the /train-jobs routes, and what the admin pages show. Its own module,
so neither router imports the other."""

from app.job_status import JobStatus
from app.models import TrainJob, WebhookDelivery, utcnow
from app.schemas import TrainJobOut, WebhookDeliveryOut
from app.webhook_delivery import origin


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


def delivery_out(row: WebhookDelivery) -> WebhookDeliveryOut:
    """A delivery as the API and the admin job page show it: the target's origin only."""
    return WebhookDeliveryOut(
        id=row.id, event_type=row.event_type, url=origin(row.url), status=row.status, attempts=row.attempts,
        next_attempt_at=row.next_attempt_at, last_error=row.last_error, created_at=row.created_at,
        delivered_at=row.delivered_at)
