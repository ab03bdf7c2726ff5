"""Stop work whose client has gone. Starlette notices a disconnect only while it streams a
response; a plain (non-streaming) request would otherwise keep its rows generating to the end."""

import asyncio
from collections.abc import Awaitable
from typing import TypeVar

from fastapi import HTTPException, Request

T = TypeVar("T")

# nginx's "client closed request": never seen by the client, but logged as what happened
CLIENT_CLOSED = 499


async def unless_disconnected(request: Request, work: Awaitable[T]) -> T:
    """Await `work`; if the client hangs up first, cancel it (which frees its engine rows)."""
    task = asyncio.ensure_future(work)

    async def watch() -> None:
        # The body has been read, so the next message is the disconnect (or nothing, until the
        # response is sent and this watcher cancelled).
        while (await request.receive())["type"] != "http.disconnect":
            pass
        task.cancel()

    watcher = asyncio.create_task(watch())
    try:
        return await task
    except asyncio.CancelledError:
        if watcher.done() and not watcher.cancelled():  # we cancelled it: the client left
            raise HTTPException(CLIENT_CLOSED, detail="client closed the request") from None
        raise
    finally:
        watcher.cancel()
