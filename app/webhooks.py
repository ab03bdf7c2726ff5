"""Job events for webhooks: when a job reaches an end (or pauses), a WebhookDelivery row per target,
written in the transaction that changes the job's state, so that the event exists exactly when the
change does. app.webhook_delivery sends them.

The targets come with the session: its factory carries this node's webhook settings in its `info`
(`session_info`, set where the node makes its sessions), so that the job registry's transitions
need no settings of their own. A session without them (webhooks off: no WEBHOOK_SECRET) writes none.
"""

import secrets
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

from sqlalchemy import select
from sqlalchemy.orm import Session

from app.job_status import JobStatus
from app.models import TrainJob, WebhookDelivery
from app.webhook_urls import shape_problem

if TYPE_CHECKING:
    from app.config import Settings

EVENT_TYPES = {
    JobStatus.SUCCEEDED: "fine_tuning.job.succeeded",
    JobStatus.FAILED: "fine_tuning.job.failed",
    JobStatus.CANCELLED: "fine_tuning.job.cancelled",
    JobStatus.PAUSED: "fine_tuning.job.paused",
}
METADATA_URL_KEY = "webhook_url"  # a job's own target, in its OpenAI `metadata`
_INFO_KEY = "webhooks"


@dataclass(frozen=True)
class Targets:
    default_url: str | None  # WEBHOOK_URL


def session_info(settings: "Settings") -> dict:
    """What a node's session factory carries in `info` for enqueue_job_event (nothing: webhooks off)."""
    return {_INFO_KEY: Targets(settings.webhook_url)} if settings.webhook_secret else {}


def job_webhook_url(metadata: dict | None) -> str | None:
    """The job's own target; None for anything that is no URL (the API refuses those, but a
    delivery row that could not be stored would fail the job's transition with it)."""
    url = (metadata or {}).get(METADATA_URL_KEY)
    return url if isinstance(url, str) and shape_problem(url) is None else None


def enqueue_job_event(session: Session, job_id: str, status: JobStatus) -> None:
    """Add the deliveries of the job's move to `status` to the session's transaction (nothing for a
    status no event names): the caller commits them with the move."""
    targets: Targets | None = session.info.get(_INFO_KEY)
    event_type = EVENT_TYPES.get(status)
    if targets is None or event_type is None:
        return
    metadata = session.scalar(select(TrainJob.job_metadata).where(TrainJob.id == job_id))
    urls = dict.fromkeys(url for url in (targets.default_url, job_webhook_url(metadata)) if url)
    # OpenAI's webhook event: one event, the same to every target; each delivery its own message id.
    event = {"object": "event", "id": f"evt_{secrets.token_hex(12)}", "type": event_type,
             "created_at": int(time.time()), "data": {"id": job_id}}
    for url in urls:
        session.add(WebhookDelivery(id=f"msg_{secrets.token_hex(12)}", job_id=job_id, event_type=event_type,
                                    url=url, payload=event))


def list_deliveries(session: Session, job_id: str) -> list[WebhookDelivery]:
    query = select(WebhookDelivery).where(WebhookDelivery.job_id == job_id)
    return list(session.scalars(query.order_by(WebhookDelivery.created_at, WebhookDelivery.id)))
