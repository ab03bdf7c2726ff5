"""Server-sent events: the framing both /generate and /v1/completions stream with."""

import json
from collections.abc import AsyncIterator

from fastapi.responses import StreamingResponse

DONE = "data: [DONE]\n\n"


def sse_event(payload: dict) -> str:
    return f"data: {json.dumps(payload, separators=(',', ':'))}\n\n"


def sse_response(events: AsyncIterator[str]) -> StreamingResponse:
    """Stream `events`. When the client disconnects, Starlette cancels the iterator, and the
    scheduler's stream cancels its row (see BatchScheduler.stream)."""
    return StreamingResponse(
        events, media_type="text/event-stream", headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
    )
