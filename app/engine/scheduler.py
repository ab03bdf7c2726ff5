"""Bounded request queue that forms mixed-adapter batches for the model.

Requests wait up to MAX_BATCH_WAIT_MS for company, then run together (up to MAX_BATCH_SIZE),
one batch at a time, in a worker thread so the event loop stays free. A full queue refuses
new work at once instead of growing without bound. Streaming requests get every token as it is
made; a stream whose client leaves is cancelled and its row leaves the batch at the next step.
"""

import asyncio
import logging
import time
import weakref
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

from app.engine.generation import GenerationRequest, GenerationResult, StepCallback

log = logging.getLogger(__name__)

THROUGHPUT_WINDOW_S = 60.0


class QueueFull(Exception):
    pass


@dataclass
class Completion:
    result: GenerationResult
    queue_seconds: float
    inference_seconds: float
    batch_size: int


@dataclass
class StreamUpdate:
    result: GenerationResult  # a snapshot: the text and tokens so far
    finished: bool


@dataclass(eq=False)  # compared and hashed by identity
class _Pending:
    request: GenerationRequest
    future: asyncio.Future
    enqueued_at: float
    updates: asyncio.Queue | None = None  # streaming requests: StreamUpdate, or the batch's exception


class BatchScheduler:
    def __init__(
        self,
        run_batch: Callable[[Sequence[GenerationRequest], StepCallback | None], list[GenerationResult]],
        max_batch_size: int,
        max_wait_ms: int,
        max_queue_size: int,
    ):
        self._run_batch = run_batch
        self.max_batch_size = max_batch_size
        self._max_wait = max_wait_ms / 1000
        # Cancelled requests stay in the queue until a batch forms and skips them, so capacity
        # counts only the ones still wanted: a client that gave up frees its place at once. The
        # queue itself is capped too, so clients that keep giving up cannot grow it without bound.
        self._queue: asyncio.Queue[_Pending] = asyncio.Queue()
        self._max_queue_size = max_queue_size
        self._waiting: set[_Pending] = set()
        self._task: asyncio.Task | None = None
        self.tokens_generated = 0
        self.batches_run = 0
        self.requests_cancelled = 0
        self._recent: deque[tuple[float, int]] = deque()  # (finish time, tokens) per batch

    @property
    def queue_depth(self) -> int:
        return len(self._waiting)

    def recent_tokens_per_second(self) -> float:
        """Tokens generated per second over the last minute."""
        horizon = time.monotonic() - THROUGHPUT_WINDOW_S
        while self._recent and self._recent[0][0] < horizon:
            self._recent.popleft()
        return sum(tokens for _, tokens in self._recent) / THROUGHPUT_WINDOW_S

    def start(self) -> None:
        self._task = asyncio.create_task(self._loop(), name="batch-scheduler")

    async def stop(self) -> None:
        if self._task:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    def _enqueue(self, request: GenerationRequest, updates: asyncio.Queue | None = None) -> _Pending:
        if len(self._waiting) >= self._max_queue_size or self._queue.qsize() >= 4 * self._max_queue_size:
            raise QueueFull
        pending = _Pending(request, asyncio.get_running_loop().create_future(), time.perf_counter(), updates)
        self._waiting.add(pending)

        def on_done(future: asyncio.Future) -> None:
            self._waiting.discard(pending)
            if future.cancelled():  # nobody wants it any more: a running row leaves its batch
                request.cancelled.set()

        pending.future.add_done_callback(on_done)
        self._queue.put_nowait(pending)
        return pending

    async def submit(self, request: GenerationRequest, timeout: float) -> Completion:
        """Queue a request and wait for its result. Cancelling the wait (client gone, timeout)
        frees the slot: cancelled requests are skipped when the next batch forms."""
        return await asyncio.wait_for(self._enqueue(request).future, timeout)

    def stream(self, request: GenerationRequest, timeout: float) -> "RequestStream":
        """Queue a request now (QueueFull is raised here, before any byte is sent) and return
        its updates: one per token, the last with `finished` set. Past `timeout` seconds the
        stream raises TimeoutError and its row is cancelled."""
        deadline = asyncio.get_running_loop().time() + timeout
        return RequestStream(self, self._enqueue(request, asyncio.Queue()), deadline)

    def _abandon(self, pending: _Pending) -> None:
        if not pending.future.done():
            pending.future.cancel()  # skipped if still queued; leaves its batch if running
            self.requests_cancelled += 1

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
        self._waiting.difference_update(batch)
        return [p for p in batch if not p.future.done()]

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = await self._next_batch()
            if not batch:
                continue

            def on_step(index: int, result: GenerationResult, finished: bool, batch=batch) -> None:
                updates = batch[index].updates
                if updates is not None:  # runs in the model thread: hand a snapshot to the loop
                    snapshot = replace(result, token_ids=list(result.token_ids))
                    loop.call_soon_threadsafe(updates.put_nowait, StreamUpdate(snapshot, finished))

            started = time.perf_counter()
            try:
                results = await asyncio.to_thread(self._run_batch, [p.request for p in batch], on_step)
            except Exception as exc:  # one bad batch must not stop the server
                log.exception("batch of %d failed", len(batch))
                for pending in batch:
                    if pending.updates is not None:
                        pending.updates.put_nowait(exc)
                    elif not pending.future.done():
                        pending.future.set_exception(exc)
                continue
            elapsed = time.perf_counter() - started
            self.batches_run += 1
            tokens = sum(len(r.token_ids) for r in results)
            self.tokens_generated += tokens
            self._recent.append((time.monotonic(), tokens))
            self.recent_tokens_per_second()  # drops entries older than the window
            for pending, result in zip(batch, results):
                if not pending.future.done():
                    pending.future.set_result(
                        Completion(result, started - pending.enqueued_at, elapsed, len(batch))
                    )


class RequestStream:
    """A streaming request's updates. Closing it before the last update (the client left) frees
    its row, whether or not it was ever read; so does dropping it, as a response that never
    started does."""

    def __init__(self, scheduler: BatchScheduler, pending: _Pending, deadline: float):
        self._updates = pending.updates
        self._deadline = deadline
        self._abandon = weakref.finalize(self, scheduler._abandon, pending)
        self._abandon.atexit = False

    def __aiter__(self) -> "RequestStream":
        return self

    async def __anext__(self) -> StreamUpdate:
        if not self._abandon.alive:
            raise StopAsyncIteration
        try:
            async with asyncio.timeout_at(self._deadline):
                update = await self._updates.get()
        except TimeoutError:
            self.cancel()
            raise TimeoutError("generation did not finish before the request deadline") from None
        if isinstance(update, BaseException) or update.finished:
            self._abandon.detach()  # it ended on its own: nothing to free
        if isinstance(update, BaseException):
            raise update
        return update

    def cancel(self) -> None:
        self._abandon()  # runs once, and only if the stream had not ended

    async def aclose(self) -> None:
        self.cancel()
