"""Training jobs: upload a dataset to start one, watch it, read its events and checkpoints,
pause, resume or cancel it."""

import asyncio
import logging
from typing import Annotated

from fastapi import APIRouter, Depends, HTTPException, Query, status
from pydantic import Field, field_validator

from app import datasets, jobs
from app.api.deps import JobId, RuntimeDep, SessionDep, invalid
from app.api.job_submission import store_and_queue
from app.api.job_view import job_out
from app.api.uploads import FileField, UploadedFile, admin_form, openapi_form
from app.auth import AdminAuth
from app.config import Settings
from app.db import MAX_INTEGER, MAX_OFFSET
from app.job_status import TERMINAL, JobStatus
from app.models import TrainJob
from app.schemas import JobCheckpointOut, JobEventOut, NoNul, TrainJobOut, TrainJobPage
from app.train_config import TrainConfig, TrainConfigBase, eval_within_the_run

log = logging.getLogger(__name__)
router = APIRouter(prefix="/train-jobs", tags=["train-jobs"])


async def _read_upload(upload: UploadedFile, field: str, settings: Settings) -> bytes:
    """The dataset as stored (normalised JSONL, an example a line); 422 listing its bad lines."""
    try:
        return await datasets.normalise_elsewhere(upload.data, field, upload.filename, settings.max_train_examples,
                                                  settings.dataset_parse_budget_s)
    except datasets.DatasetError as exc:
        raise HTTPException(422, detail={
            "message": str(exc), "field": exc.field, "error_count": len(exc.errors), "stopped": exc.stopped,
            "errors": [{"line": line, "message": message} for line, message in exc.errors],
        }) from None


# The upload: a job's configuration (its bounds and rules: app.train_config), its data and its name.
# (No docstring: pydantic would show it in the API's docs.)
class TrainJobForm(TrainConfigBase):
    file: Annotated[FileField, Field(
        description='Training data: JSONL of {"input", "output"} objects, CSV with those columns, or JSONL of chats '
                    '({"messages": [...]}, OpenAI\'s format)')]
    validation_file: Annotated[FileField | None, Field(description="Optional validation data, same format")] = None
    name: Annotated[str | None, Field(min_length=1, max_length=200, description="Name of the adapter it makes",
                                      examples=["sst2-sentiment"]), NoNul] = None

    _eval_within_the_run = field_validator("eval_every")(eval_within_the_run)


@router.post(
    "",
    status_code=status.HTTP_202_ACCEPTED,
    response_model=TrainJobOut,
    dependencies=[AdminAuth],
    openapi_extra=openapi_form(TrainJobForm),
    responses={400: {"description": "Malformed multipart body"}, 413: {"description": "Upload too large"},
               415: {"description": "Not multipart/form-data"},
               422: {"description": "Invalid dataset (offending line numbers listed) or parameter (field named)"},
               503: {"description": "The job queue (broker) is unreachable; nothing was stored"}},
)
async def create_train_job(
    runtime: RuntimeDep,
    form: Annotated[TrainJobForm, Depends(admin_form(TrainJobForm, lambda s: s.max_dataset_bytes))],
) -> TrainJobOut:
    """Validate the whole upload, store it, and queue a prompt- or prefix-tuning job (202). The
    dataset is read in a process of its own and stored and queued from a worker thread: the event
    loop keeps serving meanwhile."""
    settings = runtime.settings
    if form.num_virtual_tokens > settings.max_virtual_tokens:
        raise invalid("num_virtual_tokens", f"must be at most {settings.max_virtual_tokens}")
    train = await _read_upload(form.file, "file", settings)
    validation = await _read_upload(form.validation_file, "validation_file", settings) if form.validation_file else None
    if validation is not None and datasets.dataset_format(validation) != datasets.dataset_format(train):
        raise invalid("validation_file", f"is {datasets.dataset_format(validation)} data and file is "
                                         f"{datasets.dataset_format(train)} data: use one format")
    config = TrainConfig(**form.model_dump(include=set(TrainConfigBase.model_fields)))
    job = await asyncio.to_thread(store_and_queue, runtime, form.name, config, train, validation)
    return job_out(job)


@router.get("", response_model=TrainJobPage)
def list_train_jobs(
    session: SessionDep,
    status: Annotated[JobStatus | None, Query()] = None,
    limit: Annotated[int, Query(ge=1, le=200)] = 20,
    offset: Annotated[int, Query(ge=0, le=MAX_OFFSET)] = 0,
) -> TrainJobPage:
    items, total = jobs.list_jobs(session, status=status, limit=limit, offset=offset)
    return TrainJobPage(items=[job_out(j) for j in items], total=total, limit=limit, offset=offset)


def _get_or_404(session, job_id: str) -> TrainJob:
    job = jobs.get_job(session, job_id)
    if job is None:
        raise HTTPException(404, detail=f"train job {job_id!r} not found")
    return job


@router.get("/{job_id}", response_model=TrainJobOut, responses={404: {"description": "Unknown job"}})
def get_train_job(job_id: JobId, session: SessionDep) -> TrainJobOut:
    return job_out(_get_or_404(session, job_id))


@router.get("/{job_id}/events", response_model=list[JobEventOut], responses={404: {"description": "Unknown job"}})
def get_train_job_events(
    job_id: JobId, session: SessionDep,
    after: Annotated[int, Query(ge=0, le=MAX_INTEGER, description="Only events with a larger id (for polling)")] = 0,
    limit: Annotated[int, Query(ge=1, le=10_000)] = 1000,
):
    """Loss curve points (`train`), evaluation results (`eval`) and messages, oldest first."""
    _get_or_404(session, job_id)
    return jobs.list_events(session, job_id, after_id=after, limit=limit)


@router.post(
    "/{job_id}/cancel",
    status_code=status.HTTP_202_ACCEPTED,
    response_model=TrainJobOut,
    dependencies=[AdminAuth],
    responses={404: {"description": "Unknown job"}, 409: {"description": "The job has already finished"}},
)
def cancel_train_job(job_id: JobId, session: SessionDep) -> TrainJobOut:
    """A queued job is cancelled at once; a running one stops within a few steps."""
    job = _get_or_404(session, job_id)
    if job.status in TERMINAL:
        raise HTTPException(409, detail=f"job {job_id} has already {job.status}")
    jobs.cancel(session, job_id)
    session.expire_all()
    return job_out(_get_or_404(session, job_id))


@router.get("/{job_id}/checkpoints", response_model=list[JobCheckpointOut],
            responses={404: {"description": "Unknown job"}})
def get_train_job_checkpoints(job_id: JobId, session: SessionDep):
    """The adapters stored at evaluations that improved the job's best result, newest first, each
    servable by its `adapter_id` while the job still runs. Once the job ends, only the last three
    and the best are kept."""
    _get_or_404(session, job_id)
    return jobs.list_checkpoints(session, job_id)


@router.post(
    "/{job_id}/pause",
    status_code=status.HTTP_202_ACCEPTED,
    response_model=TrainJobOut,
    dependencies=[AdminAuth],
    responses={404: {"description": "Unknown job"}, 409: {"description": "The job is neither queued nor running"}},
)
def pause_train_job(job_id: JobId, session: SessionDep) -> TrainJobOut:
    """A queued job is paused at once; a running one stops at its next step boundary, saves its
    state to shared storage and releases its device (`pause_requested` until then)."""
    job = _get_or_404(session, job_id)
    if job.status not in (JobStatus.QUEUED, JobStatus.RUNNING):
        raise HTTPException(409, detail=f"job {job_id} is {job.status}: only a queued or running job can be paused")
    jobs.request_pause(session, job_id)
    session.expire_all()
    return job_out(_get_or_404(session, job_id))


@router.post(
    "/{job_id}/resume",
    status_code=status.HTTP_202_ACCEPTED,
    response_model=TrainJobOut,
    dependencies=[AdminAuth],
    responses={404: {"description": "Unknown job"}, 409: {"description": "The job is not paused"}},
)
def resume_train_job(job_id: JobId, session: SessionDep, runtime: RuntimeDep) -> TrainJobOut:
    """Queue a paused job again: any node goes on from its saved state, to the result it would
    have reached without the pause."""
    job = _get_or_404(session, job_id)
    if not jobs.resume(session, job_id):
        raise HTTPException(409, detail=f"job {job_id} is {job.status}: only a paused job can be resumed")
    try:
        runtime.enqueue_training(job_id)
    except Exception:  # queued all the same: job upkeep sends its message once the broker answers
        log.exception("job %s resumed, but its message could not be sent yet", job_id)
    session.expire_all()
    return job_out(_get_or_404(session, job_id))
