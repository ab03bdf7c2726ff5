"""GET /health: liveness plus what is loaded."""

from fastapi import APIRouter

from app.api.deps import RuntimeDep
from app.schemas import HealthOut

router = APIRouter(tags=["health"])


@router.get("/health", response_model=HealthOut)
def health(runtime: RuntimeDep) -> dict:
    """Liveness (no key needed), the resident model, queue depth and adapter-cache statistics."""
    base = runtime.base
    return {
        "status": "ok",
        "base_model": base.name,
        "fingerprint": base.fingerprint,
        "quantization": base.quantization,
        "device": str(base.device),
        "queue_depth": runtime.scheduler.queue_depth,
        "adapter_cache": runtime.cache.stats(),
    }
