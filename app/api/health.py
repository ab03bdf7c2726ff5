"""GET /health: liveness plus what is loaded."""

from fastapi import APIRouter, Response

from app.api.deps import RuntimeDep
from app.schemas import HealthOut

router = APIRouter(tags=["health"])


@router.get("/health", response_model=HealthOut,
            responses={503: {"model": HealthOut, "description": "The engine cannot serve: restart the node"}})
def health(runtime: RuntimeDep, response: Response) -> dict:
    """Liveness (no key needed), the resident model, and how the engine is doing: queue depth,
    running rows, KV cache and prefix cache use, adapter cache statistics. 503, with the reason in
    `problem`, when the engine cannot serve (its thread died, its state could not be rebuilt after
    a fault, or its last steps all failed), so an orchestrator restarts the node."""
    base, problem = runtime.base, runtime.engine.problem()
    if problem is not None:
        response.status_code = 503
    return {
        "status": "ok" if problem is None else "unavailable",
        "problem": problem,
        "base_model": base.name,
        "fingerprint": base.fingerprint,
        "quantization": base.quantization,
        "compute_dtype": str(base.embed_dtype).removeprefix("torch."),
        "int8_kernels": base.int8_kernels,
        "device": str(base.device),
        "queue_depth": runtime.engine.queue_depth,
        "engine": runtime.engine.stats(),
        "adapter_cache": runtime.adapter_cache.stats(),
    }
