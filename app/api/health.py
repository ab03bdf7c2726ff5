"""GET /health: liveness plus what is loaded."""

from fastapi import APIRouter

from app.api.deps import RuntimeDep
from app.schemas import HealthOut

router = APIRouter(tags=["health"])


@router.get("/health", response_model=HealthOut)
def health(runtime: RuntimeDep) -> dict:
    """Liveness (no key needed), the resident model, and how the engine is doing: queue depth,
    running rows, KV cache and prefix cache use, adapter cache statistics."""
    base = runtime.base
    return {
        "status": "ok",
        "base_model": base.name,
        "fingerprint": base.fingerprint,
        "quantization": base.quantization,
        "device": str(base.device),
        "queue_depth": runtime.engine.queue_depth,
        "engine": runtime.engine.stats(),
        "adapter_cache": runtime.cache.stats(),
    }
