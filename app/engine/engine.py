"""The serving engine: one thread owns the model and runs `EngineCore` steps back to back, while
the event loop submits requests and receives their tokens.

Requests join the running batch at the next step and leave it the step they finish, so a short
request is answered after its own few steps, whatever else is running. Admission is bounded: a
request waits while the KV cache is full, and only a full waiting queue refuses new work (503).
The queue is bounded in requests and in the KV positions they may need, so one call carrying many
long prompts cannot fill it alone. A client that goes away (closed stream, cancelled wait,
deadline) sets its request's cancel flag, and its row leaves at the next step. Events cross to
the event loop once per step.

The engine's thread is the only one that computes on the model, so training on the node's model
runs here too (`run_training_work`, the `Device` of app.engine.device), taking turns with serving
as app.engine.turns decides.
"""

import asyncio
import logging
import statistics
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from functools import partial
from typing import TypeVar, cast

import torch

from app.engine.core import THROUGHPUT_WINDOW_S, EngineCore
from app.engine.events import Admitted, EngineEvent, Failed, Finished, TokenAdded
from app.engine.requests import FinishReason, GenerationRequest, GenerationResult
from app.engine.rows import Row
from app.engine.threads import default_threads, take_cores
from app.engine.turns import Activity, TrainingItem, Turns

log = logging.getLogger(__name__)
T = TypeVar("T")


class EngineStopped(RuntimeError):
    pass


class EngineBroken(RuntimeError):
    """The engine cannot serve (its state could not be rebuilt, or its thread died): the node
    needs a restart, and /health says so."""


# An engine whose steps failed this many times in a row, healing in between, reports itself unhealthy.
FAULTS_BEFORE_UNHEALTHY = 3


class QueueFull(Exception):
    pass


class TooMuchWork(ValueError):
    """One call asks for more than the whole waiting queue holds: it could never be queued."""


@dataclass
class Completion:
    result: GenerationResult
    queue_seconds: float  # from arrival until the engine admitted it
    first_token_seconds: float  # from arrival until its first token
    inference_seconds: float  # from admission until its last token
    batch_size: float  # rows per engine step, on average, while it ran
    training_pieces_waited: int = 0  # pieces of training work begun between its arrival and first token


@dataclass
class StreamUpdate:
    result: GenerationResult  # a snapshot: the text and tokens so far
    finished: bool


@dataclass(eq=False)  # compared and hashed by identity
class _Pending:
    request: GenerationRequest
    future: asyncio.Future
    updates: asyncio.Queue | None = None  # streaming requests: StreamUpdate, or the exception that ended it
    arrived_at: float = field(default_factory=time.perf_counter)
    training_pieces_at_arrival: int = 0
    training_pieces_at_first_token: int | None = None


# What the event loop is told about one request: it left the queue, a stream update, its
# completion, or the error that ended it.
_Delivery = tuple[_Pending, Admitted | StreamUpdate | Completion | BaseException]


def _pending(row: Row) -> "_Pending":
    """The engine's handle on a row: every row it adds carries its _Pending."""
    return cast(_Pending, row.handle)


def _completion(row: Row) -> Completion:
    start, pending, finished = row.enqueued_at, _pending(row), cast(float, row.finished_at)  # it has finished
    admitted = row.admitted_at or finished
    first_token_pieces = pending.training_pieces_at_first_token
    return Completion(
        result=row.result,
        queue_seconds=admitted - start,
        first_token_seconds=(row.first_token_at or finished) - start,
        inference_seconds=finished - admitted,
        batch_size=row.num_step_rows / row.num_steps if row.num_steps else 0.0,
        training_pieces_waited=0 if first_token_pieces is None else first_token_pieces - pending.training_pieces_at_arrival,
    )


class Engine:
    def __init__(self, build_core: Callable[[], EngineCore], max_queue_size: int, max_queued_tokens: int,
                 threads: int | None = None, train_step_budget_s: float | None = None, serves: bool = True):
        # The core (its KV cache included) is built on the engine's own thread: see threads.py.
        self._build_core = build_core
        self._core: EngineCore | None = None
        self.serves = serves  # False on a node that only trains: its core keeps no serving pool
        self.threads = threads or default_threads()
        self._max_queue_size = max_queue_size
        self._max_queued_tokens = max_queued_tokens
        # Requests not yet admitted and still wanted, with the KV positions each may need: a client
        # that gave up frees its place at once.
        self._waiting: dict[_Pending, int] = {}
        self._inbox: deque[_Pending] = deque()
        self._dropped_adapters: deque[str] = deque()
        self._wake = threading.Event()
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_thread: int | None = None
        self.requests_cancelled = 0
        self._recent: deque[tuple[float, Completion]] = deque()  # finished in the last minute
        self.turns = Turns(train_step_budget_s)  # training work (Device) and its turns with serving
        self.broken: str | None = None  # why the engine cannot serve, once it cannot

    @property
    def core(self) -> EngineCore:
        """The core, built on the engine's thread by `start`."""
        if self._core is None:
            raise RuntimeError("the engine has not started")
        return self._core

    @property
    def _event_loop(self) -> asyncio.AbstractEventLoop:
        if self._loop is None:
            raise RuntimeError("the engine has not started")
        return self._loop

    # -- the Device's numbers, and the turns' accounting -----------------------------------------

    @property
    def step_budget_s(self) -> float | None:
        return self.turns.step_budget_s

    @property
    def last_longest_piece_s(self) -> float:
        return self.turns.last_longest_piece_s

    @property
    def activity(self) -> Activity | None:
        return self.turns.activity

    @property
    def training_items(self) -> int:
        return self.turns.training_items

    # -- event loop side ------------------------------------------------------------------------

    @property
    def queue_depth(self) -> int:
        return len(self._waiting)

    @property
    def queued_tokens(self) -> int:
        return sum(self._waiting.values())

    def recent_tokens_per_second(self) -> float:
        return self.core.recent_tokens_per_second()

    def problem(self) -> str | None:
        """Why this engine cannot serve, or None while it can."""
        if self.broken is not None:
            return self.broken
        if self._thread is not None and not self._thread.is_alive() and not self._stopping:
            return "the engine's thread has stopped"
        if self._core is not None and self._core.consecutive_faults >= FAULTS_BEFORE_UNHEALTHY:
            return f"the engine's last {self.core.consecutive_faults} steps failed"
        return None

    def stats(self) -> dict:
        return self.core.stats() | {"healthy": int(self.problem() is None), "queue_depth": self.queue_depth,
                                    "queued_tokens": self.queued_tokens, "requests_cancelled": self.requests_cancelled,
                                    "training_items": self.training_items, "training_active": self.activity == Activity.TRAINING}

    def recent_latency(self) -> dict[str, dict[str, float] | None]:
        """Median and 90th percentile, over requests finished in the last minute, of the time each
        waited for admission, until its first token, and in the engine."""
        horizon = time.monotonic() - THROUGHPUT_WINDOW_S
        completions = [c for at, c in list(self._recent) if at >= horizon]  # any thread may ask
        summary = {}
        for name in ("queue_seconds", "first_token_seconds", "inference_seconds"):
            values = sorted(getattr(c, name) for c in completions)
            summary[name] = {
                "p50": statistics.median(values), "p90": values[int(0.9 * (len(values) - 1))], "count": len(values),
            } if values else None
        return summary

    def start(self) -> None:
        """Start the engine's thread and build the core there; returns once it is ready."""
        self._loop = asyncio.get_running_loop()
        self._loop_thread = threading.get_ident()
        built: list[BaseException | None] = []
        ready = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(built, ready), name="engine", daemon=True)
        self._thread.start()
        ready.wait()
        if built[0] is not None:
            raise built[0]

    async def stop(self) -> None:
        if self._thread is not None:
            self._stopping = True
            self._wake.set()
            await asyncio.to_thread(self._thread.join)
        while self.turns.waiting:  # never to run: their callers stop waiting
            self.turns.waiting.popleft().settle((False, EngineStopped("the engine stopped")))

    # -- training threads' side (Device) -------------------------------------------------------

    def run_training_work(self, work: Callable[[], T]) -> T:
        """Run training work on the engine's thread, when no inference waits, and return its
        result (or raise its exception). Blocks the calling thread, which must not be the event
        loop's (it would stop serving) nor the engine's own."""
        if threading.get_ident() in (self._loop_thread, self._thread and self._thread.ident):
            raise RuntimeError("training work must be handed to the engine from a thread of its own")
        item = TrainingItem(work)
        self.turns.waiting.append(item)
        self._wake.set()
        if self._stopping and item in self.turns.waiting:
            self.turns.waiting.remove(item)
            item.settle((False, EngineStopped("the engine stopped")))
        item.done.wait()
        ok, value = cast(tuple[bool, object], item.outcome)  # settled: done is set
        if not ok:
            raise cast(BaseException, value)
        return cast(T, value)

    def generate(self, requests: list[GenerationRequest], timeout: float = 3600.0) -> list[GenerationResult]:
        """From a training thread: run `requests` through the serving queue like any client's (an
        evaluation's generation shares the serving pool and yields to user traffic as any rows
        do), and wait for them. A full queue is waited out, not failed."""
        while True:
            waiting = asyncio.run_coroutine_threadsafe(self.submit_all(requests, timeout), self._event_loop)
            try:
                return [completion.result for completion in waiting.result()]
            except QueueFull:
                time.sleep(0.05)

    def drop_adapter(self, adapter_id: str) -> None:
        """Free the adapter's cached prefixes (before the engine's next step)."""
        self._dropped_adapters.append(adapter_id)
        self._wake.set()

    def _enqueue(self, requests: list[GenerationRequest], streaming: bool) -> list[_Pending]:
        """Queue all of `requests` or none of them: RequestTooLarge if one can never fit the KV
        cache, TooMuchWork if together they exceed the whole queue, QueueFull if the queue has no
        room for them now, EngineBroken if the engine cannot serve at all."""
        if self.broken is not None or self._thread is None or not self._thread.is_alive():
            raise EngineBroken(self.problem() or "the engine has stopped")
        work = [self.core.check_fits(request) for request in requests]
        if sum(work) > self._max_queued_tokens:
            raise TooMuchWork(
                f"needs {sum(work)} KV cache positions in all (soft prompts + prompts + max new tokens); "
                f"at most {self._max_queued_tokens} may wait at once"
            )
        if (len(self._waiting) + len(requests) > self._max_queue_size
                or self.queued_tokens + sum(work) > self._max_queued_tokens):
            raise QueueFull
        loop = asyncio.get_running_loop()
        pendings = [_Pending(request, loop.create_future(), asyncio.Queue() if streaming else None,
                             training_pieces_at_arrival=self.turns.training_pieces) for request in requests]
        for pending, positions in zip(pendings, work):
            self._waiting[pending] = positions
            pending.future.add_done_callback(partial(self._done, pending))
        self._inbox.extend(pendings)
        self._wake.set()
        return pendings

    def _leave_queue(self, pending: _Pending) -> None:
        self._waiting.pop(pending, None)

    def _done(self, pending: _Pending, _future: asyncio.Future) -> None:
        self._leave_queue(pending)
        if pending.future.cancelled():  # nobody wants it any more: its row leaves at the next step
            pending.request.cancelled.set()
            self.requests_cancelled += 1

    async def submit(self, request: GenerationRequest, timeout: float) -> Completion:
        """Queue a request and wait for its result. Cancelling the wait (client gone, timeout)
        frees its place in the queue, or its row in the batch."""
        return (await self.submit_all([request], timeout))[0]

    async def submit_all(self, requests: list[GenerationRequest], timeout: float) -> list[Completion]:
        """Queue `requests` together (all or none) and wait for every result. If one fails, or
        the wait ends early, the others leave the queue or the batch."""
        futures = [pending.future for pending in self._enqueue(requests, streaming=False)]
        try:
            return await asyncio.wait_for(asyncio.gather(*futures), timeout)
        finally:
            for future in futures:
                future.cancel()  # no-op for those that finished

    def stream(self, request: GenerationRequest, timeout: float) -> "RequestStream":
        """Queue a request now (QueueFull is raised here, before any byte is sent) and return
        its updates: one per token, the last with `finished` set. Past `timeout` seconds the
        stream raises TimeoutError and its row is cancelled."""
        return self.stream_all([request], timeout)[0]

    def stream_all(self, requests: list[GenerationRequest], timeout: float) -> list["RequestStream"]:
        """Queue `requests` together (all or none), each with its own stream."""
        deadline = asyncio.get_running_loop().time() + timeout
        return [RequestStream(self, pending, deadline) for pending in self._enqueue(requests, streaming=True)]

    def _abandon(self, pending: _Pending) -> None:
        """The client left. A dropped stream's finalizer may run on any thread: the row is told at
        once, the future only on the event loop."""
        pending.request.cancelled.set()
        if threading.get_ident() == self._loop_thread:
            self._cancel(pending)
        elif not self._event_loop.is_closed():
            self._event_loop.call_soon_threadsafe(self._cancel, pending)

    def _cancel(self, pending: _Pending) -> None:
        pending.future.cancel()  # counted by _done, unless it had finished

    def _remember(self, completion: Completion) -> None:
        now = time.monotonic()
        self._recent.append((now, completion))
        while self._recent[0][0] < now - THROUGHPUT_WINDOW_S:
            self._recent.popleft()

    def _deliver(self, deliveries: Sequence[_Delivery]) -> None:
        for pending, news in deliveries:
            match news:
                case Admitted():
                    self._leave_queue(pending)
                case StreamUpdate():
                    assert pending.updates is not None  # only streams are sent their tokens
                    pending.updates.put_nowait(news)
                case Completion():
                    if news.result.finish_reason != FinishReason.CANCELLED:
                        self._remember(news)
                    if pending.updates is not None:
                        pending.updates.put_nowait(StreamUpdate(news.result, True))
                    if not pending.future.done():
                        pending.future.set_result(news)
                case _:  # failed: a stream reports it through its updates, a plain request through its future
                    if pending.updates is not None:
                        pending.updates.put_nowait(news)
                    if not pending.future.done():
                        pending.future.set_exception(news)
                        if pending.updates is not None:
                            pending.future.exception()  # retrieved: the stream raises it instead

    # -- engine thread --------------------------------------------------------------------------

    def _run(self, built: list, ready: threading.Event) -> None:
        torch.set_grad_enabled(False)
        take_cores(self.threads)
        try:
            self._core = self._build_core()
            built.append(None)
        except BaseException as exc:
            built.append(exc)
            return
        finally:
            ready.set()
        try:
            self._loop_until_stopped()
        except BaseException as exc:  # a bug outside any step: nothing can serve on this node now
            self._break("the engine's thread stopped on an internal error", exc)

    def _loop_until_stopped(self) -> None:
        while True:
            self._wake.wait()
            self._wake.clear()
            if self._stopping:
                return
            self._take_new_work()
            if self.turns.waiting and (not self.core.has_work() or self._training_due()):
                self._train(self.turns.waiting.popleft())
            elif self.core.has_work():
                self._serve_step()
            if self.core.has_work() or self.turns.waiting:
                self._wake.set()  # more to do

    def _break(self, reason: str, exc: BaseException) -> None:
        """The engine cannot go on: say why (health reads it) and fail everything it holds."""
        log.critical("%s: the node must be restarted", reason, exc_info=exc)
        self.broken = reason
        error = EngineBroken(reason)
        error.__cause__ = exc
        self._post([(_pending(event.row), error) for event in self.core.fail_all(error)])
        for pending in list(self._inbox):
            self._post([(pending, error)])
        self._inbox.clear()

    def _take_new_work(self) -> None:
        while self._dropped_adapters:
            self.core.drop_adapter(self._dropped_adapters.popleft())
        refused: list[_Delivery] = []
        while self._inbox:
            pending = self._inbox.popleft()
            try:
                self.core.add(pending.request, handle=pending, arrived_at=pending.arrived_at)
            except Exception as exc:  # this request alone cannot run
                refused.append((pending, exc))
        self._post(refused)

    def _serve_step(self) -> None:
        paused = self.turns.activity
        self.turns.activity = Activity.INFERENCE
        try:
            with torch.inference_mode():
                self._post(self._deliveries(self.core.admit()))  # before the pass, which may take a while
                self._post(self._deliveries(self.core.forward_step()))
        except Exception as exc:  # a fault the core could not heal
            self._break("the engine could not rebuild its state after a fault", exc)
        finally:
            self.turns.activity = paused

    def _training_due(self) -> bool:
        return self.turns.training_due(self.core.awaiting_first_token)

    def _train(self, item: TrainingItem) -> None:
        self.turns.train(item, self.core.base.model, self.core.device, self._serve_between_pieces)

    def _serve_between_pieces(self) -> None:
        """At a pause point of training work: serve until no inference waits, or training is due."""
        while not self._stopping:
            self._take_new_work()
            if not self.core.has_work() or self._training_due():
                break
            self._serve_step()

    def _post(self, deliveries: Sequence[_Delivery]) -> None:
        if deliveries:
            self._event_loop.call_soon_threadsafe(self._deliver, deliveries)

    def _deliveries(self, events: list[EngineEvent]) -> list[_Delivery]:
        for event in events:
            if isinstance(event, TokenAdded | Finished) and _pending(event.row).training_pieces_at_first_token is None:
                _pending(event.row).training_pieces_at_first_token = self.turns.training_pieces
        return [(_pending(event.row), self._news(event)) for event in events
                if not isinstance(event, TokenAdded) or _pending(event.row).updates is not None]

    @staticmethod
    def _news(event: EngineEvent) -> Admitted | StreamUpdate | Completion | BaseException:
        match event:
            case TokenAdded(row):
                return StreamUpdate(replace(row.result, token_ids=list(row.result.token_ids)), False)
            case Finished(row):
                return _completion(row)
            case Failed(row):
                assert row.error is not None  # a failed row carries its error
                return row.error
            case Admitted():
                return event


class RequestStream:
    """A streaming request's updates. Closing it before the last update (the client left) frees
    its row, whether or not it was ever read; so does dropping it, as a response that never
    started does."""

    def __init__(self, engine: Engine, pending: _Pending, deadline: float):
        assert pending.updates is not None  # queued as a stream
        self._updates = pending.updates
        self._deadline = deadline
        self._abandon = weakref.finalize(self, engine._abandon, pending)
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
