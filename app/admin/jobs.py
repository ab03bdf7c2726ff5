"""The training-job pages: the live list, one job with its curves, and the new-job form."""

from typing import Annotated, Literal

from fastapi import Query, Request

from app import jobs, webhooks
from app.admin.pages import not_found, page_router, render
from app.admin.paging import MAX_PAGE, PER_PAGE_CHOICES, Pager
from app.api.deps import RuntimeDep, SettingsDep
from app.api.job_view import delivery_out, job_out
from app.schemas import JobCheckpointOut
from app.train_config import DEFAULT_LEARNING_RATES, TrainConfig

router = page_router()


@router.get("/jobs")
def job_list(
    request: Request,
    runtime: RuntimeDep,
    status: Literal[(*jobs.STATUSES, "")] = "",
    page: Annotated[int, Query(ge=1, le=MAX_PAGE)] = 1,
    per_page: Annotated[int, Query(ge=1, le=max(PER_PAGE_CHOICES))] = PER_PAGE_CHOICES[0],
):
    with runtime.sessions() as session:
        items, total = jobs.list_jobs(session, status=status or None, limit=per_page, offset=(page - 1) * per_page)
        counts = jobs.count_by_status(session)
    return render(request, "jobs.html", nav="jobs", jobs=[job_out(j) for j in items],
                  pager=Pager(page, per_page, total), status=status, counts=counts, statuses=jobs.STATUSES)


# Declared before /jobs/{job_id}, which would otherwise take "new" for an id.
@router.get("/jobs/new")
def new_job_form(request: Request, settings: SettingsDep):
    return render(request, "job_new.html", nav="jobs", defaults=TrainConfig(), learning_rates=DEFAULT_LEARNING_RATES,
                  max_virtual_tokens=settings.max_virtual_tokens)


@router.get("/jobs/{job_id}")
def job_detail(request: Request, job_id: str, runtime: RuntimeDep):
    with runtime.sessions() as session:
        job = jobs.get_job(session, job_id)
        if job is None:
            raise not_found(request, f"Training job {job_id}")
        checkpoints = [JobCheckpointOut.model_validate(c) for c in jobs.list_checkpoints(session, job_id)]
        deliveries = [delivery_out(d) for d in webhooks.list_deliveries(session, job_id)]
    return render(request, "job.html", nav="jobs", job=job_out(job), terminal=jobs.TERMINAL,
                  checkpoints=checkpoints, deliveries=deliveries)
