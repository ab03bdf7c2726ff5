"""The overview page: what is loaded, what it costs in memory, how serving and training are doing."""

import psutil
import torch
from fastapi import Request

from app import jobs, registry
from app.admin.pages import page_router, render
from app.api.deps import RuntimeDep, SessionDep
from app.engine.loader import BaseModel

router = page_router()
RECENT = 5


def memory_stats(base: BaseModel) -> dict[str, int | None]:
    """Bytes held by the model's weights, by this whole process, and on the GPU (None on CPU)."""
    on_cuda = base.device.type == "cuda"
    return {
        "model": base.model.get_memory_footprint(),
        "process_rss": psutil.Process().memory_info().rss,
        "cuda_allocated": torch.cuda.memory_allocated(base.device) if on_cuda else None,
        "cuda_reserved": torch.cuda.memory_reserved(base.device) if on_cuda else None,
    }


@router.get("")
def overview(request: Request, runtime: RuntimeDep, session: SessionDep):
    adapters_by_source = registry.count_by_source(session)
    jobs_by_status = jobs.count_by_status(session)
    recent_adapters, _ = registry.list_adapters(session, limit=RECENT)
    recent_jobs, _ = jobs.list_jobs(session, limit=RECENT)
    return render(
        request, "overview.html", nav="overview",
        base=runtime.base, memory=memory_stats(runtime.base),
        queue_depth=runtime.engine.queue_depth, max_queue=runtime.settings.max_queue_size,
        engine=runtime.engine.stats(), latency=runtime.engine.recent_latency(), max_rows=runtime.settings.max_batch_size,
        adapter_cache=runtime.adapter_cache.stats(), tokens_per_second=runtime.engine.recent_tokens_per_second(),
        adapters_by_source=adapters_by_source, jobs_by_status=jobs_by_status,
        recent_adapters=recent_adapters, recent_jobs=recent_jobs, job_statuses=jobs.STATUSES,
    )
