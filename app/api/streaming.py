"""Server-sent events: the framing both /generate and /v1/completions stream with, and the
merge that interleaves the streams of several prompts."""

import asyncio
import json
import logging
from collections.abc import AsyncIterator, Sequence
from contextlib import aclosing
from typing import TypeVar

from fastapi.responses import StreamingResponse

from app.api.errors import public_message

T = TypeVar("T")
log = logging.getLogger(__name__)

DONE = "data: [DONE]\n\n"


def sse_event(payload: dict) -> str:
    return f"data: {json.dumps(payload, separators=(',', ':'))}\n\n"


async def _events(payloads: AsyncIterator[dict]) -> AsyncIterator[str]:
    async with aclosing(payloads):
        try:
            async for payload in payloads:
                yield sse_event(payload)
        except Exception as exc:  # the batch failed after the response began: say so in the stream
            if not isinstance(exc, TimeoutError):
                log.error("stream failed: %s", public_message(exc), exc_info=exc)
            yield sse_event({"error": {"message": f"generation failed: {public_message(exc)}", "type": "server_error"}})
    yield DONE


def sse_response(payloads: AsyncIterator[dict]) -> StreamingResponse:
    """Stream `payloads` as `data:` events, then `data: [DONE]`. When the client disconnects,
    Starlette cancels the iterator (or it is closed), and the engine's stream cancels its row
    (see Engine.stream)."""
    headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
    return StreamingResponse(_events(payloads), media_type="text/event-stream", headers=headers)


async def merge(sources: Sequence[AsyncIterator[T]]) -> AsyncIterator[tuple[int, T]]:
    """Interleave `sources`, yielding (index of the source, item) as items arrive. If the merge
    ends early (closed, cancelled, or a source failed), every source still running is cancelled."""
    arrivals: asyncio.Queue = asyncio.Queue()

    async def pump(index: int, source: AsyncIterator[T]) -> None:
        async with aclosing(source):
            async for item in source:
                arrivals.put_nowait((index, item))

    tasks = [asyncio.create_task(pump(i, source)) for i, source in enumerate(sources)]
    for task in tasks:  # runs after the task's last item is queued
        task.add_done_callback(lambda task: arrivals.put_nowait((None, task)))
    try:
        running = len(tasks)
        while running:
            index, item = await arrivals.get()
            if index is None:
                running -= 1
                item.result()  # raises the source's error
            else:
                yield index, item
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)  # every source closed before we return
