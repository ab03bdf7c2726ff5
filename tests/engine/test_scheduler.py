import asyncio
import threading

import pytest

from app.engine.generation import GenerationRequest, GenerationResult
from app.engine.scheduler import BatchScheduler, QueueFull


def request(tag: int) -> GenerationRequest:
    return GenerationRequest(prompt_ids=[tag], soft_prompt=None, max_new_tokens=1)


class RecordingModel:
    """Stands in for generate_batch: records batch sizes, can be held to let a queue build."""

    def __init__(self):
        self.batches: list[list[int]] = []
        self.release = threading.Event()
        self.release.set()

    def __call__(self, requests, on_step=None):
        self.release.wait(5)
        self.batches.append([r.prompt_ids[0] for r in requests])
        return [GenerationResult(token_ids=[r.prompt_ids[0]], text=str(r.prompt_ids[0])) for r in requests]


async def test_concurrent_requests_share_batches_and_get_their_own_result():
    model = RecordingModel()
    scheduler = BatchScheduler(model, max_batch_size=4, max_wait_ms=50, max_queue_size=100)
    scheduler.start()
    try:
        completions = await asyncio.gather(*(scheduler.submit(request(i), timeout=5) for i in range(10)))
    finally:
        await scheduler.stop()
    assert [c.result.text for c in completions] == [str(i) for i in range(10)]
    assert max(len(b) for b in model.batches) == 4
    assert sorted(sum(model.batches, [])) == list(range(10))
    assert len(model.batches) <= 4


async def test_full_queue_refuses_at_once():
    model = RecordingModel()
    model.release.clear()  # the first batch blocks, so later requests queue up
    scheduler = BatchScheduler(model, max_batch_size=1, max_wait_ms=0, max_queue_size=2)
    scheduler.start()
    try:
        first = asyncio.create_task(scheduler.submit(request(0), timeout=5))
        await asyncio.sleep(0.1)  # taken off the queue and running
        waiting = [asyncio.create_task(scheduler.submit(request(i), timeout=5)) for i in (1, 2)]
        await asyncio.sleep(0.05)
        with pytest.raises(QueueFull):
            await scheduler.submit(request(3), timeout=5)
        model.release.set()
        assert [c.result.text for c in await asyncio.gather(first, *waiting)] == ["0", "1", "2"]
    finally:
        model.release.set()
        await scheduler.stop()


async def test_cancelled_request_is_dropped_before_its_batch_runs():
    model = RecordingModel()
    model.release.clear()
    scheduler = BatchScheduler(model, max_batch_size=8, max_wait_ms=0, max_queue_size=10)
    scheduler.start()
    try:
        first = asyncio.create_task(scheduler.submit(request(0), timeout=5))
        await asyncio.sleep(0.1)
        gone = asyncio.create_task(scheduler.submit(request(1), timeout=5))
        kept = asyncio.create_task(scheduler.submit(request(2), timeout=5))
        await asyncio.sleep(0.05)
        gone.cancel()  # the client went away while queued
        model.release.set()
        await asyncio.gather(first, kept)
    finally:
        model.release.set()
        await scheduler.stop()
    assert model.batches == [[0], [2]]


async def test_a_failing_batch_fails_its_requests_and_the_loop_goes_on():
    calls = 0

    def flaky(requests, on_step=None):
        nonlocal calls
        calls += 1
        if calls == 1:
            raise RuntimeError("out of memory")
        return [GenerationResult(text="ok") for _ in requests]

    scheduler = BatchScheduler(flaky, max_batch_size=1, max_wait_ms=0, max_queue_size=10)
    scheduler.start()
    try:
        with pytest.raises(RuntimeError, match="out of memory"):
            await scheduler.submit(request(0), timeout=5)
        assert (await scheduler.submit(request(1), timeout=5)).result.text == "ok"
    finally:
        await scheduler.stop()


class SteppingModel:
    """Stands in for generate_batch: makes `tokens` steps per row, reporting each, until cancelled."""

    def __init__(self, tokens: int, step_seconds: float = 0.0):
        self.tokens, self.step_seconds = tokens, step_seconds
        self.steps_done: list[int] = []

    def __call__(self, requests, on_step=None):
        import time

        results = [GenerationResult() for _ in requests]
        live = set(range(len(requests)))
        for step in range(self.tokens):
            time.sleep(self.step_seconds)
            for i in sorted(live):
                if requests[i].cancelled.is_set():
                    results[i].finish_reason = "cancelled"
                    live.discard(i)
                    on_step(i, results[i], True)
                    continue
                results[i].token_ids.append(step)
                results[i].text += f"{step} "
                on_step(i, results[i], step == self.tokens - 1)
            if not live:
                break
        self.steps_done = [len(r.token_ids) for r in results]
        return results


async def test_stream_yields_every_token_in_order_and_ends_finished():
    scheduler = BatchScheduler(SteppingModel(tokens=5), max_batch_size=4, max_wait_ms=0, max_queue_size=10)
    scheduler.start()
    try:
        updates = [u async for u in scheduler.stream(request(0), timeout=30)]
    finally:
        await scheduler.stop()
    assert [len(u.result.token_ids) for u in updates] == [1, 2, 3, 4, 5]
    assert [u.finished for u in updates] == [False] * 4 + [True]
    assert updates[-1].result.text == "0 1 2 3 4 " and scheduler.requests_cancelled == 0


async def test_leaving_a_stream_cancels_its_row_but_not_its_neighbours():
    model = SteppingModel(tokens=200, step_seconds=0.005)
    scheduler = BatchScheduler(model, max_batch_size=4, max_wait_ms=50, max_queue_size=10)
    scheduler.start()
    try:
        leaving = scheduler.stream(request(0), timeout=30)
        staying = asyncio.create_task(scheduler.submit(request(1), timeout=30))
        async for update in leaving:
            if len(update.result.token_ids) == 3:
                break  # the client went away
        await leaving.aclose()
        completion = await staying
    finally:
        await scheduler.stop()
    assert scheduler.requests_cancelled == 1
    assert model.steps_done[0] < 20 and model.steps_done[1] == 200
    assert len(completion.result.token_ids) == 200


async def test_a_full_queue_refuses_a_stream_before_it_starts():
    model = RecordingModel()
    model.release.clear()
    scheduler = BatchScheduler(model, max_batch_size=1, max_wait_ms=0, max_queue_size=1)
    scheduler.start()
    try:
        first = asyncio.create_task(scheduler.submit(request(0), timeout=5))
        await asyncio.sleep(0.1)
        waiting = asyncio.create_task(scheduler.submit(request(1), timeout=5))
        await asyncio.sleep(0.05)
        with pytest.raises(QueueFull):
            scheduler.stream(request(2), timeout=30)
        model.release.set()
        await asyncio.gather(first, waiting)
    finally:
        model.release.set()
        await scheduler.stop()


@pytest.mark.parametrize("how", ["closed", "dropped"])
async def test_a_stream_never_read_still_frees_its_row(how):
    import gc

    model = SteppingModel(tokens=200, step_seconds=0.005)
    scheduler = BatchScheduler(model, max_batch_size=4, max_wait_ms=50, max_queue_size=10)
    scheduler.start()
    try:
        unread = scheduler.stream(request(0), timeout=30)
        staying = asyncio.create_task(scheduler.submit(request(1), timeout=30))
        await asyncio.sleep(0.2)  # both rows are generating
        if how == "closed":
            await unread.aclose()
        else:  # a response that never started is simply garbage
            del unread
            gc.collect()
        await staying
    finally:
        await scheduler.stop()
    assert scheduler.requests_cancelled == 1
    assert model.steps_done[0] < 150 and model.steps_done[1] == 200


async def test_a_request_given_up_while_queued_frees_its_place_at_once():
    model = RecordingModel()
    model.release.clear()
    scheduler = BatchScheduler(model, max_batch_size=1, max_wait_ms=0, max_queue_size=1)
    scheduler.start()
    try:
        first = asyncio.create_task(scheduler.submit(request(0), timeout=5))
        await asyncio.sleep(0.1)  # running, and held
        gone = asyncio.create_task(scheduler.submit(request(1), timeout=5))
        await asyncio.sleep(0.05)
        assert scheduler.queue_depth == 1
        gone.cancel()
        await asyncio.gather(gone, return_exceptions=True)
        assert scheduler.queue_depth == 0
        kept = asyncio.create_task(scheduler.submit(request(2), timeout=5))  # no QueueFull: the place is free
        await asyncio.sleep(0.05)
        model.release.set()
        await asyncio.gather(first, kept)
    finally:
        model.release.set()
        await scheduler.stop()
    assert model.batches == [[0], [2]]


async def test_a_stream_past_its_deadline_ends_with_timeout_and_frees_its_row():
    model = SteppingModel(tokens=400, step_seconds=0.005)
    scheduler = BatchScheduler(model, max_batch_size=4, max_wait_ms=0, max_queue_size=10)
    scheduler.start()
    try:
        with pytest.raises(TimeoutError, match="deadline"):
            async for _ in scheduler.stream(request(0), timeout=0.3):
                pass
        while scheduler.batches_run == 0:
            await asyncio.sleep(0.01)
    finally:
        await scheduler.stop()
    assert scheduler.requests_cancelled == 1 and 10 < model.steps_done[0] < 200


async def test_a_timed_out_wait_also_stops_its_row():
    model = SteppingModel(tokens=400, step_seconds=0.005)
    scheduler = BatchScheduler(model, max_batch_size=4, max_wait_ms=0, max_queue_size=10)
    scheduler.start()
    try:
        with pytest.raises(TimeoutError):
            await scheduler.submit(request(0), timeout=0.3)
        while scheduler.batches_run == 0:
            await asyncio.sleep(0.01)
    finally:
        await scheduler.stop()
    assert 10 < model.steps_done[0] < 200
