"""The serving engine: its thread, the bounded queue, streams and cancellation, on the tiny model."""

import asyncio
import gc
import threading
import time

import pytest

from app.engine.core import EngineCore, EngineFault, RequestTooLarge
from app.engine.engine import FAULTS_BEFORE_UNHEALTHY, Engine, EngineBroken, QueueFull
from app.engine.reference import reference_greedy_decode
from app.engine.requests import GenerationRequest
from tests.conftest import before_each_forward
from tests.engine.test_generation import SST2_PROMPTS


def request(base, i: int, max_new_tokens: int) -> GenerationRequest:
    return GenerationRequest(base.tokenizer(SST2_PROMPTS[i % len(SST2_PROMPTS)]).input_ids, None, max_new_tokens)


@pytest.fixture
async def make_engine(tiny_base):
    engines = []

    def make(max_rows=8, max_queue_size=16, max_queued_tokens=65_536, **core_settings) -> Engine:
        settings = {"kv_tokens": 4096, "max_rows": max_rows} | core_settings
        engine = Engine(lambda: EngineCore(tiny_base, **settings), max_queue_size=max_queue_size,
                        max_queued_tokens=max_queued_tokens)
        engine.start()
        engines.append(engine)
        return engine

    yield make
    for engine in engines:
        await engine.stop()


async def test_concurrent_requests_share_steps_and_each_gets_its_own_result(make_engine, tiny_base):
    engine = make_engine()
    sampled = before_each_forward(engine, lambda n: None)
    requests = [request(tiny_base, i, 8) for i in range(6)]
    completions = await asyncio.gather(*(engine.submit(r, timeout=30) for r in requests))
    for req, completion in zip(requests, completions):
        assert completion.result.token_ids == reference_greedy_decode(tiny_base, None, req.prompt_ids, 8)
        assert completion.queue_seconds >= 0 and completion.first_token_seconds > 0 and completion.inference_seconds > 0
    assert max(sampled) > 1 and max(c.batch_size for c in completions) > 1


async def test_a_short_request_is_answered_while_long_ones_keep_generating(make_engine, tiny_base):
    engine = make_engine()
    before_each_forward(engine, lambda n: time.sleep(0.002))
    long_ones = [asyncio.create_task(engine.submit(request(tiny_base, i, 64), timeout=30)) for i in range(3)]
    short = await engine.submit(request(tiny_base, 4, 4), timeout=30)
    assert len(short.result.token_ids) == 4
    assert not any(task.done() for task in long_ones)  # answered the step it finished, not at the end
    assert all(len(c.result.token_ids) == 64 for c in await asyncio.gather(*long_ones))


async def test_a_full_queue_refuses_at_once_and_a_given_up_place_is_free_again(make_engine, tiny_base):
    engine = make_engine(max_rows=1, max_queue_size=2)
    started, release = threading.Event(), threading.Event()
    before_each_forward(engine, lambda n: started.set() or release.wait(10))
    running = asyncio.create_task(engine.submit(request(tiny_base, 0, 2), timeout=30))
    await asyncio.to_thread(started.wait, 10)  # admitted and held
    waiting = [asyncio.create_task(engine.submit(request(tiny_base, i, 2), timeout=30)) for i in (1, 2)]
    await asyncio.sleep(0.05)
    assert engine.queue_depth == 2
    with pytest.raises(QueueFull):
        await engine.submit(request(tiny_base, 3, 2), timeout=30)
    waiting[0].cancel()  # the client went away while queued
    await asyncio.gather(waiting[0], return_exceptions=True)
    assert engine.queue_depth == 1
    kept = asyncio.create_task(engine.submit(request(tiny_base, 4, 2), timeout=30))  # the place is free
    await asyncio.sleep(0.05)
    release.set()
    await asyncio.gather(running, waiting[1], kept)
    assert engine.core.requests_admitted == 3  # the cancelled one never ran


async def test_a_request_too_large_for_the_kv_cache_is_refused_before_it_queues(make_engine, tiny_base):
    engine = make_engine(kv_tokens=64)
    with pytest.raises(RequestTooLarge):
        await engine.submit(request(tiny_base, 0, 200), timeout=30)
    assert engine.queue_depth == 0


async def test_a_stream_yields_every_token_in_order_and_ends_finished(make_engine, tiny_base):
    engine = make_engine()
    req = request(tiny_base, 0, 6)
    updates = [u async for u in engine.stream(req, timeout=30)]
    assert [len(u.result.token_ids) for u in updates] == [1, 2, 3, 4, 5, 6]
    assert [u.finished for u in updates] == [False] * 5 + [True]
    assert updates[-1].result.token_ids == reference_greedy_decode(tiny_base, None, req.prompt_ids, 6)
    assert engine.requests_cancelled == 0


async def test_leaving_a_stream_stops_its_row_but_not_its_neighbours(make_engine, tiny_base):
    engine = make_engine()
    before_each_forward(engine, lambda n: time.sleep(0.002))
    leaving = engine.stream(request(tiny_base, 0, 300), timeout=30)
    staying = asyncio.create_task(engine.submit(request(tiny_base, 1, 300), timeout=30))
    async for update in leaving:
        if len(update.result.token_ids) == 3:
            break
    await leaving.aclose()
    completion = await staying
    assert engine.requests_cancelled == 1 and len(completion.result.token_ids) == 300
    assert engine.core.tokens_generated < 300 + 50


@pytest.mark.parametrize("how", ["closed", "dropped"])
async def test_a_stream_never_read_still_frees_its_row(make_engine, tiny_base, how):
    engine = make_engine()
    before_each_forward(engine, lambda n: time.sleep(0.002))
    unread = engine.stream(request(tiny_base, 0, 300), timeout=30)
    staying = asyncio.create_task(engine.submit(request(tiny_base, 1, 300), timeout=30))
    await asyncio.sleep(0.2)  # both rows are generating
    if how == "closed":
        await unread.aclose()
    else:  # a response that never started is simply garbage
        del unread
        gc.collect()
    await staying
    assert engine.requests_cancelled == 1 and engine.core.tokens_generated < 300 + 250


async def test_a_stream_past_its_deadline_ends_with_timeout_and_frees_its_row(make_engine, tiny_base):
    engine = make_engine()
    before_each_forward(engine, lambda n: time.sleep(0.002))
    with pytest.raises(TimeoutError, match="deadline"):
        async for _ in engine.stream(request(tiny_base, 0, 400), timeout=0.3):
            pass
    while engine.core.running:
        await asyncio.sleep(0.01)
    assert engine.requests_cancelled == 1 and 10 < engine.core.tokens_generated < 300


async def test_a_timed_out_wait_also_stops_its_row(make_engine, tiny_base):
    engine = make_engine()
    before_each_forward(engine, lambda n: time.sleep(0.002))
    with pytest.raises(TimeoutError):
        await engine.submit(request(tiny_base, 0, 400), timeout=0.3)
    while engine.core.running:
        await asyncio.sleep(0.01)
    assert 10 < engine.core.tokens_generated < 300


async def test_a_failing_pass_fails_its_requests_and_the_engine_goes_on(make_engine, tiny_base):
    engine = make_engine()

    def fail_second_pass(n):
        if n == 2:
            raise RuntimeError("device lost")

    before_each_forward(engine, fail_second_pass)
    with pytest.raises(EngineFault) as raised:
        await engine.submit(request(tiny_base, 0, 5), timeout=30)
    assert str(raised.value.__cause__) == "device lost"
    assert len((await engine.submit(request(tiny_base, 1, 5), timeout=30)).result.token_ids) == 5
    assert engine.stats()["faults"] == 1 and engine.problem() is None


async def test_a_fault_in_the_engine_itself_fails_what_it_holds_and_it_keeps_serving(make_engine, tiny_base):
    engine = make_engine()
    plan, calls = engine.core._plan, []

    def broken_once():
        calls.append(1)
        if len(calls) == 1:
            raise KeyError("bug")
        return plan()

    engine.core._plan = broken_once
    with pytest.raises(EngineFault):
        await engine.submit(request(tiny_base, 0, 3), timeout=30)
    assert len((await engine.submit(request(tiny_base, 1, 3), timeout=30)).result.token_ids) == 3


async def test_a_row_past_the_first_table_width_leaves_the_engine_serving(make_engine, tiny_base):
    """Issue 21, finding 1: a row whose keys passed the slot table's first width made the table
    an inference tensor, and every later admission failed."""
    engine = make_engine(kv_tokens=2048)
    ids = tiny_base.tokenizer("Hi").input_ids
    first = await engine.submit(GenerationRequest(ids, None, 600), timeout=60)
    assert len(first.result.token_ids) == 600
    for max_new_tokens in (2, 70, 300):
        req = GenerationRequest(ids, None, max_new_tokens)
        done = await engine.submit(req, timeout=60)
        assert done.result.token_ids == reference_greedy_decode(tiny_base, None, ids, max_new_tokens)
    assert engine.stats()["faults"] == 0


async def test_a_fault_during_admission_fails_the_step_rows_keeps_the_waiting_and_rebuilds(make_engine, tiny_base):
    engine = make_engine(max_rows=2, prefix_cache_tokens=0)
    hold = threading.Event()
    before_each_forward(engine, lambda n: hold.wait(10))
    running = asyncio.create_task(engine.submit(request(tiny_base, 0, 4), timeout=30))
    while engine.core is None or not engine.core.running:
        await asyncio.sleep(0.01)
    reserve, calls = engine.core.slots.reserve, []

    def broken_once(row, num_positions):  # the next admission raises, as the inference-tensor table did
        calls.append(row)
        if len(calls) == 1:
            raise RuntimeError("Inplace update to inference tensor outside InferenceMode")
        return reserve(row, num_positions)

    engine.core.slots.reserve = broken_once
    admitting = asyncio.create_task(engine.submit(request(tiny_base, 1, 4), timeout=30))
    waiting = asyncio.create_task(engine.submit(request(tiny_base, 2, 4), timeout=30))
    while len(engine.core.waiting) + len(engine._inbox) < 2:
        await asyncio.sleep(0.01)
    hold.set()
    for failed in (running, admitting):
        with pytest.raises(EngineFault):
            await failed
    req = request(tiny_base, 2, 4)
    assert (await waiting).result.token_ids == reference_greedy_decode(tiny_base, None, req.prompt_ids, 4)
    core = engine.core
    assert core.faults == 1 and core.consecutive_faults == 0 and engine.problem() is None
    assert core.kv.stats()["used_tokens"] == 0 and core.kv.stats()["reserved_tokens"] == 0


async def test_an_engine_that_cannot_rebuild_says_so_and_refuses_work(make_engine, tiny_base):
    engine = make_engine()

    def broken(*args):
        raise RuntimeError("device lost")

    engine.core._plan = broken
    engine.core.kv.reset = broken  # the rebuild fails too
    with pytest.raises(EngineBroken):
        await engine.submit(request(tiny_base, 0, 3), timeout=30)
    assert engine.problem() == "the engine could not rebuild its state after a fault"
    with pytest.raises(EngineBroken):
        await engine.submit(request(tiny_base, 1, 3), timeout=30)


async def test_an_engine_whose_every_step_fails_reports_itself_unhealthy(make_engine, tiny_base):
    engine = make_engine()
    engine.core._plan = lambda: (_ for _ in ()).throw(RuntimeError("every step"))
    for i in range(FAULTS_BEFORE_UNHEALTHY):
        assert engine.problem() is None
        with pytest.raises(EngineFault):
            await engine.submit(request(tiny_base, i, 3), timeout=30)
    assert engine.problem() == f"the engine's last {FAULTS_BEFORE_UNHEALTHY} steps failed"


async def test_an_engine_whose_thread_died_says_so(make_engine, tiny_base):
    engine = make_engine()
    engine._take_new_work = lambda: (_ for _ in ()).throw(SystemError("bug outside any step"))
    with pytest.raises(EngineBroken):
        await engine.submit(request(tiny_base, 0, 3), timeout=30)
    engine._thread.join(5)
    assert engine.problem() == "the engine's thread stopped on an internal error"


async def test_dropping_an_adapter_frees_its_prefix_before_the_next_step(make_engine, tiny_base):
    from app.engine.requests import SoftPrompt
    from tests.conftest import random_soft_prompt

    engine = make_engine()
    soft = SoftPrompt(random_soft_prompt(tiny_base, 8, seed=1), adapter_id="doomed")
    req = GenerationRequest(tiny_base.tokenizer(SST2_PROMPTS[0]).input_ids, soft, 3)
    await engine.submit(req, timeout=30)
    assert engine.stats()["prefix_cache"]["entries"] == 1
    engine.drop_adapter("doomed")
    deadline = time.monotonic() + 5
    while engine.stats()["prefix_cache"]["entries"]:
        assert time.monotonic() < deadline
        await asyncio.sleep(0.01)
    assert engine.stats()["kv_cache"]["used_tokens"] == 0


async def test_only_the_engines_thread_computes_on_several_cores(make_engine, tiny_base):
    import torch

    engine = make_engine()
    inside = []
    before_each_forward(engine, lambda n: inside.append(torch.get_num_threads()))
    await engine.submit(request(tiny_base, 0, 2), timeout=30)
    fresh = []
    thread = threading.Thread(target=lambda: fresh.append(torch.get_num_threads()))
    thread.start()
    thread.join()
    assert set(inside) == {engine.threads} and fresh == [1]  # a new thread keeps no OpenMP pool
