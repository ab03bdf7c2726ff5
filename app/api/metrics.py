"""GET /metrics: the node's Prometheus metrics (app.observability), behind an API key like the
other read routes."""

from fastapi import APIRouter
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from app.api.deps import RuntimeDep

router = APIRouter(tags=["operations"])


EXAMPLE = """# HELP softserve_tokens_generated_total Tokens generated
# TYPE softserve_tokens_generated_total counter
softserve_tokens_generated_total 21093.0
# HELP softserve_http_requests_total HTTP requests answered
# TYPE softserve_http_requests_total counter
softserve_http_requests_total{method="POST",route="/generate",status="200"} 412.0
"""


@router.get("/metrics", response_class=Response, responses={
    200: {"content": {CONTENT_TYPE_LATEST: {"example": EXAMPLE}}, "description": "Prometheus text format"}})
def metrics(runtime: RuntimeDep) -> Response:
    """Requests and latency per route and per adapter, tokens generated, queue depth and batch
    size, KV cache and adapter cache use and hits, training jobs by status and run durations."""
    return Response(generate_latest(runtime.metrics.registry), media_type=CONTENT_TYPE_LATEST)
