"""Bounded request queue that forms mixed-adapter batches for the model.

Requests wait up to MAX_BATCH_WAIT_MS for company, then run together (up to MAX_BATCH_SIZE),
one batch at a time, in a worker thread so the event loop stays free. A full queue refuses
new work at once instead of growing without bound.
"""

import asyncio
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from app.engine.generation import GenerationRequest, GenerationResult

log = logging.getLogger(__name__)


class QueueFull(Exception):
    pass


@dataclass
class Completion:
    result: GenerationResult
    queue_seconds: float
    inference_seconds: float
    batch_size: int


@dataclass
class _Pending:
    request: GenerationRequest
    future: asyncio.Future
    enqueued_at: float


class BatchScheduler:
    def __init__(
        self,
        run_batch: Callable[[Sequence[GenerationRequest]], list[GenerationResult]],
        max_batch_size: int,
        max_wait_ms: int,
        max_queue_size: int,
    ):
        self._run_batch = run_batch
        self.max_batch_size = max_batch_size
        self._max_wait = max_wait_ms / 1000
        self._queue: asyncio.Queue[_Pending] = asyncio.Queue(maxsize=max_queue_size)
        self._task: asyncio.Task | None = None
        self.tokens_generated = 0
        self.batches_run = 0

    @property
    def queue_depth(self) -> int:
        return self._queue.qsize()

    def start(self) -> None:
        self._task = asyncio.create_task(self._loop(), name="batch-scheduler")

    async def stop(self) -> None:
        if self._task:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    async def submit(self, request: GenerationRequest, timeout: float) -> Completion:
        """Queue a request and wait for its result. Cancelling the wait (client gone, timeout)
        frees the slot: cancelled requests are skipped when the next batch forms."""
        future = asyncio.get_running_loop().create_future()
        try:
            self._queue.put_nowait(_Pending(request, future, time.perf_counter()))
        except asyncio.QueueFull:
            raise QueueFull from None
        return await asyncio.wait_for(future, timeout)

    async def _next_batch(self) -> list[_Pending]:
        batch = [await self._queue.get()]
        deadline = time.perf_counter() + self._max_wait
        while len(batch) < self.max_batch_size:
            if not self._queue.empty():
                batch.append(self._queue.get_nowait())
                continue
            remaining = deadline - time.perf_counter()
            if remaining <= 0:
                break
            try:
                batch.append(await asyncio.wait_for(self._queue.get(), remaining))
            except TimeoutError:
                break
        return [p for p in batch if not p.future.done()]

    async def _loop(self) -> None:
        while True:
            batch = await self._next_batch()
            if not batch:
                continue
            started = time.perf_counter()
            try:
                results = await asyncio.to_thread(self._run_batch, [p.request for p in batch])
            except Exception as exc:  # one bad batch must not stop the server
                log.exception("batch of %d failed", len(batch))
                for pending in batch:
                    if not pending.future.done():
                        pending.future.set_exception(exc)
                continue
            elapsed = time.perf_counter() - started
            self.batches_run += 1
            for pending, result in zip(batch, results):
                self.tokens_generated += len(result.token_ids)
                if not pending.future.done():
                    pending.future.set_result(
                        Completion(result, started - pending.enqueued_at, elapsed, len(batch))
                    )
