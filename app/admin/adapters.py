"""The adapter pages: a searchable, sortable, paged table, and one adapter in full."""

from typing import Annotated

from fastapi import Query, Request

from app import jobs, registry
from app.admin.pages import not_found, page_router, render
from app.admin.paging import MAX_PAGE, PER_PAGE_CHOICES, Pager
from app.api.deps import RuntimeDep, SessionDep
from app.schemas import NoNul

router = page_router()

# Table columns: (sort key in registry.SORT_COLUMNS, heading, kind). Numbers and dates sort
# largest/newest first on the first click, text A to Z; numbers are right-aligned.
COLUMNS = (
    ("name", "Name", "text"), ("id", "ID", "text"), ("source", "Source", "text"),
    ("num_virtual_tokens", "Virtual tokens", "number"), ("size_bytes", "Size", "number"),
    ("created_at", "Created", "date"), ("eval_accuracy", "Eval accuracy", "number"),
)


@router.get("/adapters")
def adapter_list(
    request: Request,
    session: SessionDep,
    q: Annotated[str, Query(max_length=200), NoNul] = "",
    sort: registry.AdapterSort = registry.DEFAULT_SORT,
    page: Annotated[int, Query(ge=1, le=MAX_PAGE)] = 1,
    per_page: Annotated[int, Query(ge=1, le=max(PER_PAGE_CHOICES))] = PER_PAGE_CHOICES[0],
):
    items, total = registry.list_adapters(
        session, name=q.strip() or None, sort=sort, limit=per_page, offset=(page - 1) * per_page)
    return render(request, "adapters.html", nav="adapters", adapters=items, pager=Pager(page, per_page, total),
                  q=q, sort=sort, columns=COLUMNS)


@router.get("/adapters/{adapter_id}")
def adapter_detail(request: Request, adapter_id: str, runtime: RuntimeDep, session: SessionDep):
    adapter = registry.get_adapter(session, adapter_id)
    if adapter is None:
        raise not_found(request, f"Adapter {adapter_id}")
    job = jobs.job_for_adapter(session, adapter_id)
    return render(request, "adapter.html", nav="adapters", adapter=adapter, job=job,
                  served_fingerprint=runtime.base.fingerprint)
