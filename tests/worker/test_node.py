"""One node, one model: training runs on the model the engine serves with, as the engine's work
items, between serving steps, and changes nothing serving sees."""

import asyncio
import gc
import threading
from functools import partial
from types import SimpleNamespace

import httpx
import pytest
import torch

from app.datasets import Example
from app.engine.core import EngineCore
from app.engine.engine import Engine
from app.engine.requests import GenerationRequest
from app.main import create_app
from app.train_config import TrainConfig
from tests.conftest import LiveServer, make_settings, random_soft_prompt
from tests.worker.test_end_to_end import sst2_slice
from tests.worker.test_node_lifetime import wait_until
from worker import consumer, job_runner
from worker.consumer import training_consumer
from worker.training import Hooks, MicroBatches, train_adapter

EXAMPLES = [Example(f"review number {i} is {'good' if i % 2 else 'bad'}", ["negative", "positive"][i % 2])
            for i in range(24)]


class ItemWatch:
    """The engine as a Device, noting whether a training work item is open right now."""

    def __init__(self, engine: Engine):
        self.engine, self.open = engine, False
        self.step_budget_s = engine.step_budget_s
        self.serves, self.generate = engine.serves, engine.generate

    @property
    def last_longest_piece_s(self) -> float:
        return self.engine.last_longest_piece_s

    def run_training_work(self, work):
        def watched():
            self.open = True
            try:
                return work()
            finally:
                self.open = False

        return self.engine.run_training_work(watched)


def module_flags(model: torch.nn.Module) -> dict:
    return {name: (m.training, getattr(m, "gradient_checkpointing", None), len(m._forward_hooks),
                   len(m._forward_pre_hooks)) for name, m in model.named_modules()}


async def serve_during_training(base, requests, config, examples, budget_s=0.25):
    """Serve `requests` once idle, then again while a job trains: sent from inside a training
    item's forward, with pause points still ahead of it. Returns (idle completions, completions
    during training, what the engine saw)."""
    engine = Engine(partial(EngineCore, base, kv_tokens=4096, max_rows=16), 64, 65_536, train_step_budget_s=budget_s)
    engine.start()
    watch = ItemWatch(engine)
    seen = SimpleNamespace(layer_calls=[], nested_steps=0, flags_ok=True)
    flags = module_flags(base.model)
    engine_thread = engine._thread.ident
    loop = asyncio.get_running_loop()
    queued = threading.Event()
    sent = []

    async def send():
        task = asyncio.ensure_future(engine.submit_all(requests, 120))
        await asyncio.sleep(0)  # the task has queued the requests
        queued.set()
        return await task

    def record_layer(module, args):  # every decoder layer call: who computes, in which mode
        seen.layer_calls.append((threading.get_ident() == engine_thread, engine.activity, torch.is_grad_enabled()))
        if engine.activity == "training" and torch.is_grad_enabled() and not sent:
            # The first layer of a training micro-batch's forward: the next layer's pause point and
            # backward's are still ahead. Send the requests and wait until they are queued: polling
            # for an open item from outside could catch one in its last moment.
            sent.append(asyncio.run_coroutine_threadsafe(send(), loop))
            assert queued.wait(30)

    def record_step(rows, logits):
        if watch.open:
            seen.nested_steps += 1
            seen.flags_ok &= module_flags(base.model) == flags

    try:
        idle = await engine.submit_all(requests, 120)
        first_layer = base.model.model.layers[0]
        handle = first_layer.register_forward_pre_hook(record_layer)
        engine.core.logits_hook = record_step
        flags = module_flags(base.model)  # with the test's own hook
        await asyncio.to_thread(train_adapter, base, config, examples, None, Hooks(), watch)
        handle.remove()
        engine.core.logits_hook = None
        during = await asyncio.wrap_future(sent[0]) if sent else []
        return idle, during, seen
    finally:
        await engine.stop()


def test_serving_and_training_take_turns_on_the_engine_thread(tiny_base):
    requests = [GenerationRequest(prompt_ids=[2, 10 + i, 20, 30], soft_prompt=random_soft_prompt(tiny_base, 3 + i, i),
                                  max_new_tokens=6) for i in range(3)]
    config = TrainConfig(num_virtual_tokens=4, max_steps=40, batch_size=4, eval_every=1000, template="{input} =>")
    idle, during, seen = asyncio.run(serve_during_training(tiny_base, requests, config, EXAMPLES))
    assert during, "no request was sent while a training item was open"
    # Every layer call ran on the engine's thread, in a serving step or a training item, never both:
    # serving without autograd, training with it (and without, for its evaluation).
    assert seen.layer_calls and all(on_engine for on_engine, _, _ in seen.layer_calls)
    assert {(activity, grad) for _, activity, grad in seen.layer_calls} == {
        ("inference", False), ("training", True), ("training", False)}
    assert seen.nested_steps > 0 and seen.flags_ok  # served inside training items, with nothing flipped
    # Arriving mid-item, each request got its first token at the next pause point: no stretch of
    # training began between its arrival and its first token.
    assert [c.training_pieces_waited for c in during] == [0, 0, 0]
    assert [c.result.token_ids for c in during] == [c.result.token_ids for c in idle]


@pytest.mark.real_model
def test_int8_serving_outputs_while_a_job_trains_equal_idle_outputs(real_base):
    assert real_base.quantization == "int8"
    tokenizer = real_base.tokenizer
    requests = [GenerationRequest(prompt_ids=tokenizer(text).input_ids, soft_prompt=random_soft_prompt(real_base, 8, i),
                                  max_new_tokens=8)
                for i, text in enumerate(["Review: a gorgeous film\nSentiment:", "The capital of France is", "1, 2, 3,"])]
    config = TrainConfig(num_virtual_tokens=8, max_steps=2, batch_size=2, eval_every=1000, template="{input} =>")
    idle, during, seen = asyncio.run(serve_during_training(real_base, requests, config, EXAMPLES[:8]))
    assert during and seen.nested_steps > 0 and seen.flags_ok
    assert [c.result.token_ids for c in during] == [c.result.token_ids for c in idle]


def test_micro_batches_shrink_to_the_budget_and_never_below_what_helps():
    device = SimpleNamespace(step_budget_s=0.1, last_longest_piece_s=0.0)

    def after_items(sizes, longest_pieces):
        """The rows chosen after each work item whose longest stretch was as given."""
        chosen = []
        for longest in longest_pieces:
            device.last_longest_piece_s = longest
            sizes.observe()
            chosen.append(sizes.rows)
        return chosen

    sizes = MicroBatches(device, batch_size=8)
    assert sizes.rows == 1 and [len(rows) for rows in sizes.split(list(range(8)))] == [1] * 8
    # Stretches grow with rows: 1, 2 and 4 rows fit the budget, 8 overrun it, so 4 it stays.
    assert after_items(sizes, [0.02, 0.04, 0.08, 0.16, 0.08, 0.08]) == [2, 4, 8, 4, 4, 4]
    # Every RETRY_EVERY items the size that overran is tried again: one slow stretch may be noise.
    assert after_items(sizes, [0.08] * (MicroBatches.RETRY_EVERY - 3)) == [4] * (MicroBatches.RETRY_EVERY - 4) + [8]
    assert after_items(sizes, [0.05]) == [8]
    # A part that does not shrink with rows (one row already overruns): fewer rows would only be slower.
    assert after_items(MicroBatches(device, batch_size=8), [0.25, 0.26, 0.25, 0.27, 0.26]) == [2, 4, 8, 8, 8]
    assert MicroBatches(SimpleNamespace(step_budget_s=None), 8).rows == 8  # nothing to share the device with


@pytest.fixture
def node(tmp_path, sqlite_url, tiny_base):
    """A node that serves and trains, in this process: uvicorn, the engine and the Celery consumer
    (embedded broker) around the tiny model."""
    settings = make_settings(tmp_path, sqlite_url)
    with LiveServer(create_app(settings, base=tiny_base, services=[training_consumer])) as server:
        yield server


def distinct_storages_shaped_like(tensor: torch.Tensor) -> int:
    return len({t.untyped_storage().data_ptr() for t in gc.get_objects()
                if isinstance(t, torch.nn.Parameter) and t.shape == tensor.shape and t.dtype == tensor.dtype})


def test_a_node_trains_on_the_model_it_serves_with(node, tiny_base, monkeypatch):
    calls, copies = [], []
    embedding = tiny_base.model.get_input_embeddings().weight
    before = distinct_storages_shaped_like(embedding)  # the model's, and any other test model of this shape

    def spy(job_id, **kwargs):
        calls.append(kwargs)
        return run_job(job_id, **kwargs)

    def counting_train_adapter(*args):  # while the job's run holds whatever it loaded
        copies.append(distinct_storages_shaped_like(embedding))
        return train_adapter(*args)

    run_job = consumer.run_job
    monkeypatch.setattr(consumer, "run_job", spy)
    monkeypatch.setattr(job_runner, "train_adapter", counting_train_adapter)
    url = node.url
    job_id = httpx.post(f"{url}/train-jobs", files={"file": ("t.jsonl", sst2_slice("train", 40))},
                        data={"max_steps": "6", "eval_every": "3", "num_virtual_tokens": "4"}).json()["id"]
    wait_until(lambda: httpx.get(f"{url}/train-jobs/{job_id}").json()["status"] == "succeeded", "the job succeeds")
    runtime = node.runtime
    assert calls[0]["base"] is runtime.base and calls[0]["device"] is runtime.engine
    assert copies == [before] and runtime.engine.training_items > 6  # its steps ran as the engine's work items
    job = httpx.get(f"{url}/train-jobs/{job_id}").json()
    served = httpx.post(f"{url}/generate", json={"adapter_id": job["adapter_id"], "prompt": "a fine film", "max_new_tokens": 3})
    assert served.status_code == 200, served.text
    metrics = httpx.get(f"{url}/metrics").text  # the run's duration, on the node that ran it
    assert 'softserve_job_duration_seconds_count{status="succeeded"} 1.0' in metrics


def test_under_sustained_load_training_still_gets_turns_and_arrivals_are_not_held_back(tiny_base):
    async def scenario():
        engine = Engine(partial(EngineCore, base, kv_tokens=8192, max_rows=16), 64, 1 << 20, train_step_budget_s=0.002)
        engine.start()
        started_under_load = []

        class Counting(ItemWatch):
            def run_training_work(self, work):
                def counted():
                    started_under_load.append(engine.core.has_work())
                    return work()
                return super().run_training_work(counted)

        try:
            watch = Counting(engine)
            busy = [asyncio.create_task(engine.submit(long_request(i), 300)) for i in range(4)]
            while not engine.core.running:
                await asyncio.sleep(0.001)
            config = TrainConfig(num_virtual_tokens=4, max_steps=2, batch_size=4, eval_every=1000, template="{input} =>")
            training = asyncio.create_task(asyncio.to_thread(train_adapter, base, config, EXAMPLES, None, Hooks(), watch))
            while not watch.open:
                await asyncio.sleep(0.001)
            short = await engine.submit(GenerationRequest(prompt_ids=[2, 7, 8], soft_prompt=None, max_new_tokens=4), 300)
            assert not all(task.done() for task in busy)  # a short request is not held behind the long ones
            await training
            assert not all(task.done() for task in busy), "the load ended before training did"
            await asyncio.gather(*busy)
            return short, started_under_load
        finally:
            await engine.stop()

    base = tiny_base

    def long_request(i):
        return GenerationRequest(prompt_ids=[2, 5 + i, 9], soft_prompt=random_soft_prompt(base, 3, i), max_new_tokens=480)

    short, started_under_load = asyncio.run(scenario())
    assert short.result.finish_reason == "length" and len(short.result.token_ids) == 4
    assert sum(started_under_load) >= 3  # training items began while every step had rows to serve


def test_cancel_through_the_engine_stops_within_a_step(tiny_base):
    async def scenario():
        engine = Engine(partial(EngineCore, tiny_base, kv_tokens=4096, max_rows=8), 64, 65_536, train_step_budget_s=1e-4)
        engine.start()
        try:
            steps = []
            config = TrainConfig(num_virtual_tokens=4, max_steps=100, batch_size=4, eval_every=1000)
            hooks = Hooks(on_step=lambda s, *_: steps.append(s), should_cancel=lambda: len(steps) >= 3)
            result = await asyncio.to_thread(train_adapter, tiny_base, config, EXAMPLES, None, hooks, engine)
            return result, steps, engine.training_items
        finally:
            await engine.stop()

    result, steps, items = asyncio.run(scenario())
    assert result.cancelled and result.steps == 3 and steps == [1, 2, 3]
    assert items >= 1 + 3 * 2  # the initial prompt, then per step: its micro-batches and the update


def test_an_evaluation_on_a_serving_node_generates_through_the_serving_pool(tiny_base, monkeypatch):
    """Issue 22: each evaluation built a second KV pool of its own beside the serving one."""
    import worker.training

    def second_pool(*args, **kwargs):
        raise AssertionError("an evaluation built a pool of its own")

    monkeypatch.setattr(worker.training, "generate_batch", second_pool)
    config = TrainConfig(num_virtual_tokens=4, max_steps=2, batch_size=4, eval_every=2, template="{input} =>")

    async def train_on_a_serving_engine():
        engine = Engine(partial(EngineCore, tiny_base, kv_tokens=4096, max_rows=16), 64, 65_536, train_step_budget_s=0.25)
        engine.start()
        try:
            result = await asyncio.to_thread(train_adapter, tiny_base, config, EXAMPLES, EXAMPLES[:6], Hooks(), engine)
            return result, engine.core.requests_admitted
        finally:
            await engine.stop()

    result, admitted = asyncio.run(train_on_a_serving_engine())
    assert result.eval_accuracy is not None and admitted == 6  # the six evaluation rows, queued like any request's
