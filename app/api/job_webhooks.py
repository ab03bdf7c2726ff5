"""A training job's webhook deliveries: each event on its way to each target, with its attempts."""

from fastapi import APIRouter, HTTPException

from app import jobs, webhooks
from app.api.deps import JobId, SessionDep
from app.models import WebhookDelivery
from app.schemas import WebhookDeliveryOut
from app.webhook_delivery import origin

router = APIRouter(prefix="/train-jobs", tags=["train-jobs"])


@router.get("/{job_id}/webhooks", response_model=list[WebhookDeliveryOut],
            responses={404: {"description": "Unknown job"}})
def get_train_job_webhooks(job_id: JobId, session: SessionDep) -> list[WebhookDeliveryOut]:
    """The job's webhook deliveries (events `fine_tuning.job.succeeded`, `failed`, `cancelled`,
    `paused`), oldest first: pending (with its next attempt), delivered, or failed (given up)."""
    if jobs.get_job(session, job_id) is None:
        raise HTTPException(404, detail=f"train job {job_id!r} not found")
    return [delivery_out(row) for row in webhooks.list_deliveries(session, job_id)]


def delivery_out(row: WebhookDelivery) -> WebhookDeliveryOut:
    """A delivery as the API and the admin job page show it: the target's origin only."""
    return WebhookDeliveryOut(
        id=row.id, event_type=row.event_type, url=origin(row.url), status=row.status, attempts=row.attempts,
        next_attempt_at=row.next_attempt_at, last_error=row.last_error, created_at=row.created_at,
        delivered_at=row.delivered_at)
