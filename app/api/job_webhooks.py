"""A training job's webhook deliveries: each event on its way to each target, with its attempts."""

from fastapi import APIRouter, HTTPException

from app import jobs, webhooks
from app.api.deps import JobId, SessionDep
from app.api.job_view import delivery_out
from app.schemas import WebhookDeliveryOut

router = APIRouter(prefix="/train-jobs", tags=["train-jobs"])


@router.get("/{job_id}/webhooks", response_model=list[WebhookDeliveryOut],
            responses={404: {"description": "Unknown job"}})
def get_train_job_webhooks(job_id: JobId, session: SessionDep) -> list[WebhookDeliveryOut]:
    """The job's webhook deliveries (events `fine_tuning.job.succeeded`, `failed`, `cancelled`,
    `paused`), oldest first: pending (with its next attempt), delivered, or failed (given up)."""
    if jobs.get_job(session, job_id) is None:
        raise HTTPException(404, detail=f"train job {job_id!r} not found")
    return [delivery_out(row) for row in webhooks.list_deliveries(session, job_id)]

