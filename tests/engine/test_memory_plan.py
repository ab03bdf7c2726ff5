"""The memory plan: the KV pool sized from what the device has, never more than the batch can use,
KV_CACHE_TOKENS as an override, no serving pool on a node that only trains, and the CUDA profile
passes (run here on the CPU: the same code a GPU node runs, its byte counts faked)."""

import pytest
import torch

from app.engine import memory_plan
from app.engine.kv_cache import BLOCK_SIZE
from app.engine.memory_plan import MemorySettings, NotEnoughMemory, plan_memory

GIB = 1 << 30


def settings(**overrides) -> MemorySettings:
    return MemorySettings(**({"kv_cache_tokens": None, "gpu_memory_utilization": 0.9, "cpu_memory_utilization": 0.05,
                              "max_step_tokens": 512, "max_rows": 32, "max_row_positions": 3072} | overrides))


class FakeCuda:
    """A 12 GiB device with `used` GiB taken (weights, context) and `activations` GiB at a step's peak."""

    def __init__(self, monkeypatch, used: float, serving: float, training: float, cap: float = 1.0):
        self.profiled = []
        monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (int((12 - used) * GIB), 12 * GIB))
        monkeypatch.setattr(torch.cuda, "get_per_process_memory_fraction", lambda device=None: cap)
        monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device=None: int(used * GIB))
        monkeypatch.setattr(memory_plan, "_serving_peak", lambda base, s: self.profiled.append("serving") or int(serving * GIB))
        monkeypatch.setattr(memory_plan, "_training_peak", lambda base: self.profiled.append("training") or int(training * GIB))


def on_cuda(base):
    return type(base)(**{**base.__dict__, "device": torch.device("cuda")})


def test_on_a_gpu_the_pool_is_what_the_utilization_leaves_after_weights_and_activations(tiny_base, monkeypatch):
    cuda = FakeCuda(monkeypatch, used=7.0, serving=0.5, training=1.0)
    base = on_cuda(tiny_base)
    plan = plan_memory(base, settings(max_rows=4096))  # so the batch's own cap does not bind
    per_token = tiny_base.kv_shape.bytes_per_token
    expected = int((12 * 0.9 - 7.0 - 1.5) * GIB) // per_token // BLOCK_SIZE * BLOCK_SIZE
    assert cuda.profiled == ["serving", "training"]
    assert (plan.kv_cache_tokens, plan.activation_reserve_bytes) == (expected, int(1.5 * GIB))
    assert plan.free_bytes == int(5.0 * GIB) - int(1.5 * GIB) - expected * per_token
    assert plan_memory(base, settings(max_rows=4096, trains=False)).kv_cache_tokens > expected  # no training room kept


def test_a_process_capped_below_its_device_plans_within_the_cap(tiny_base, monkeypatch):
    """bench.gpu_node caps an H200's 141 GB at 12 GiB, as on a consumer card."""
    FakeCuda(monkeypatch, used=2.0, serving=0.5, training=1.0, cap=0.5)  # 6 GiB of the 12
    plan = plan_memory(on_cuda(tiny_base), settings(max_rows=4096))
    per_token = tiny_base.kv_shape.bytes_per_token
    assert plan.total_bytes == 6 * GIB
    assert plan.kv_cache_tokens == int((6 * 0.9 - 2.0 - 1.5) * GIB) // per_token // BLOCK_SIZE * BLOCK_SIZE


def test_the_pool_never_exceeds_what_the_batch_can_use_and_a_plan_too_small_is_refused(tiny_base, monkeypatch):
    FakeCuda(monkeypatch, used=7.0, serving=0.5, training=1.0)
    base = on_cuda(tiny_base)
    assert plan_memory(base, settings(max_rows=4, max_row_positions=3072)).kv_cache_tokens == 4 * 3072
    FakeCuda(monkeypatch, used=10.6, serving=0.1, training=0.1)
    with pytest.raises(NotEnoughMemory, match="fewer than one request of the largest size needs"):
        plan_memory(base, settings())


def test_on_the_cpu_the_pool_is_a_share_of_the_free_ram(tiny_base, monkeypatch):
    monkeypatch.setattr(memory_plan.psutil, "virtual_memory", lambda: type("M", (), {"available": 8 * GIB, "total": 24 * GIB}))
    per_token = tiny_base.kv_shape.bytes_per_token
    plan = plan_memory(tiny_base, settings(cpu_memory_utilization=0.001, max_rows=4096))
    assert plan.kv_cache_tokens == int(8 * GIB * 0.001) // per_token // BLOCK_SIZE * BLOCK_SIZE
    assert plan.total_bytes == 24 * GIB and plan.weights_bytes > 0


def test_an_explicit_pool_is_kept_and_a_node_that_only_trains_has_none(tiny_base):
    assert plan_memory(tiny_base, settings(kv_cache_tokens=2048)).kv_cache_tokens == 2048
    assert plan_memory(tiny_base, settings(serves=False)).kv_cache_tokens == 0


def test_the_profiling_passes_run_on_every_model_shape(tiny_base, monkeypatch):
    """What a GPU node runs to measure its activations, here with the byte counts left out."""
    ran = []
    monkeypatch.setattr(memory_plan, "_peak_beyond_now", lambda device, work: ran.append(work()) or 0)
    assert memory_plan._serving_peak(tiny_base, settings(max_step_tokens=64)) == 0
    assert memory_plan._training_peak(tiny_base) == 0
    assert len(ran) == 2
    assert not any(p.grad is not None for p in tiny_base.model.parameters())  # the model stays frozen


def test_the_training_profile_is_a_default_job_s_micro_step_as_the_trainer_runs_it(tiny_base, monkeypatch):
    """Checkpointed layer by layer, as the trainer runs a default job: the profile without it held
    every layer's activations and left an OPT-6.7B under a 12 GiB cap no KV cache (an H200)."""
    from app.engine import model_view
    from app.train_config import TrainConfig
    from worker.training import Row, wants_checkpointing

    job = TrainConfig()
    rows = [Row.of(list(range(job.max_length - 1)), [1])] * job.batch_size
    assert memory_plan.TRAIN_PROFILE_ROWS == job.batch_size
    assert memory_plan.TRAIN_PROFILE_TOKENS == job.num_virtual_tokens + job.max_length
    assert wants_checkpointing(None, rows, job.num_virtual_tokens, on_gpu=True) is True  # as the profile runs it
    checkpointed, checkpoint = [], model_view.checkpoint
    monkeypatch.setattr(model_view, "checkpoint", lambda *a, **k: checkpointed.append(1) or checkpoint(*a, **k))
    monkeypatch.setattr(memory_plan, "_peak_beyond_now", lambda device, work: work() or 0)
    memory_plan._training_peak(tiny_base)
    assert len(checkpointed) == tiny_base.model.config.num_hidden_layers


def test_running_out_of_memory_while_profiling_is_a_clear_refusal(tiny_base, monkeypatch):
    FakeCuda(monkeypatch, used=9.0, serving=0.5, training=0.0)

    def out_of_memory(base):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 56.00 MiB.")

    monkeypatch.setattr(memory_plan, "_training_peak", out_of_memory)
    with pytest.raises(NotEnoughMemory, match="ran out of memory profiling a serving step and a training micro-step"):
        plan_memory(on_cuda(tiny_base), settings())


def test_a_train_only_node_allocates_no_serving_pool(tmp_path, sqlite_url, tiny_base):
    import asyncio

    from app.runtime import running
    from tests.conftest import make_settings

    async def pool_tokens() -> int:
        async with running(make_settings(tmp_path, sqlite_url), tiny_base, serves=False) as runtime:
            return runtime.engine.core.memory_plan.kv_cache_tokens, runtime.engine.core.kv.capacity_blocks

    assert asyncio.run(pool_tokens()) == (0, 1)  # one block: the core's smallest, never served from

