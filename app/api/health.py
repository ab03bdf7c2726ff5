"""GET /health: liveness plus what is loaded."""

from fastapi import APIRouter

from app.api.deps import RuntimeDep

router = APIRouter(tags=["health"])


@router.get("/health")
def health(runtime: RuntimeDep) -> dict:
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
