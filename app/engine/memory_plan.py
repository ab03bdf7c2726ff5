"""How a node's memory is split: the model's weights, room for a step's activations (and a
training step's, on a node that trains), the KV pool, and what is left.

On CUDA the pool is what remains of GPU_MEMORY_UTILIZATION of the device once the weights are
loaded and profiling passes have shown the activations' peak (vLLM's way): a serving step at
MAX_STEP_TOKENS and, where the node trains, a training micro-step. On the CPU, where memory is
shared with everything else, it is CPU_MEMORY_UTILIZATION of the RAM available after loading.
Either way the pool is never larger than the running batch can use (MAX_BATCH_SIZE rows of the
largest request the API admits), KV_CACHE_TOKENS overrides the plan, and a node that only trains
has no serving pool at all. The plan is computed once, where the pool is allocated.
"""

from dataclasses import asdict, dataclass
from typing import Any

import psutil
import torch

from app.engine.attention import RowGroup, StepAttention
from app.engine.kv_cache import BLOCK_SIZE, KVCache
from app.engine.loader import BaseModel
from app.engine.model_runner import ModelRunner
from app.engine.model_view import training_view

# A training micro-step as profiled: the default job's batch (8 rows of 20 virtual and 128 prompt
# and target tokens), called as the trainer calls it on a GPU (where alone this profile runs):
# through the training view, each layer checkpointed. There the trainer also cuts every micro-batch
# to these positions (worker.training), so only a single row longer than that (MAX_LENGTH past
# 1,164 tokens) holds more. Profiled without checkpointing, the step held every layer's activations:
# under a 12 GiB cap that left an OPT-6.7B no room for the KV cache and ran a Llama-3-8B out of
# memory (bench.gpu_node on an H200, 2026-12-04).
TRAIN_PROFILE_ROWS, TRAIN_PROFILE_TOKENS = 8, 20 + 128


class NotEnoughMemory(RuntimeError):
    """The plan leaves no room for even one request of the largest size."""


@dataclass(frozen=True)
class MemoryPlan:
    basis: str  # how the pool was sized
    total_bytes: int  # the device's memory (CUDA) or the machine's RAM
    weights_bytes: int  # the resident model's parameters and buffers
    activation_reserve_bytes: int  # the peak of a serving step and a training step beyond the weights (profiled on CUDA)
    kv_cache_tokens: int
    kv_cache_bytes: int
    free_bytes: int  # what the plan leaves: the allocator's slack, other processes

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class MemorySettings:
    kv_cache_tokens: int | None  # an explicit pool, or None for the plan
    gpu_memory_utilization: float
    cpu_memory_utilization: float
    max_step_tokens: int
    max_rows: int
    max_row_positions: int
    serves: bool = True
    trains: bool = True


def weights_bytes(model: torch.nn.Module) -> int:
    tensors = {id(t): t for t in [*model.parameters(), *model.buffers()]}  # tied weights once
    return sum(t.numel() * t.element_size() for t in tensors.values())


def plan_memory(base: BaseModel, settings: MemorySettings) -> MemoryPlan:
    per_token = base.kv_shape.bytes_per_token
    usable = settings.max_rows * settings.max_row_positions  # the most positions the batch can hold
    weights = weights_bytes(base.model)
    if base.device.type == "cuda":
        free, total = torch.cuda.mem_get_info(base.device)
        fraction = torch.cuda.get_per_process_memory_fraction(base.device)
        if fraction < 1:  # the process's allocator is capped below the device: plan within the cap
            total = int(total * fraction)
            free = min(free, total - torch.cuda.memory_reserved(base.device))
    else:
        free, total = psutil.virtual_memory().available, psutil.virtual_memory().total
    if not settings.serves:
        return MemoryPlan("a node that only trains: no serving pool", total, weights, 0, 0, 0, free)
    if settings.kv_cache_tokens is not None:
        tokens = settings.kv_cache_tokens
        return MemoryPlan("KV_CACHE_TOKENS", total, weights, 0, tokens, tokens * per_token, free - tokens * per_token)
    if base.device.type == "cuda":
        try:
            activations = _serving_peak(base, settings) + (_training_peak(base) if settings.trains else 0)
        except torch.OutOfMemoryError as exc:
            profiled = "a serving step and a training micro-step" if settings.trains else "a serving step"
            raise NotEnoughMemory(
                f"the device ran out of memory profiling {profiled} beside the weights ({weights / 2**20:,.0f} MiB):"
                " lower MAX_STEP_TOKENS, serve a smaller model, or train on a node of its own") from exc
        budget = int(total * settings.gpu_memory_utilization) - (total - free) - activations
        basis = f"GPU_MEMORY_UTILIZATION={settings.gpu_memory_utilization:g} of the device"
    else:
        activations = 0
        budget = int(free * settings.cpu_memory_utilization)
        basis = f"CPU_MEMORY_UTILIZATION={settings.cpu_memory_utilization:g} of the RAM available"
    tokens = min(budget // per_token, usable) // BLOCK_SIZE * BLOCK_SIZE
    if tokens < settings.max_row_positions:
        raise NotEnoughMemory(
            f"the memory plan ({basis}) leaves {max(budget, 0) / 2**20:,.0f} MiB for the KV cache: "
            f"{max(tokens, 0)} positions, fewer than one request of the largest size needs "
            f"({settings.max_row_positions}); raise the utilization, or lower MAX_PROMPT_TOKENS / MAX_NEW_TOKENS_LIMIT")
    return MemoryPlan(basis, total, weights, activations, tokens, tokens * per_token,
                      free - activations - tokens * per_token)


def _peak_beyond_now(device: torch.device, work) -> int:
    """The device memory `work` allocates at its peak beyond what is allocated now."""
    torch.cuda.synchronize(device)
    before = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    work()
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device) - before
    torch.cuda.empty_cache()
    return peak


def _serving_peak(base: BaseModel, settings: MemorySettings) -> int:
    """A step of MAX_STEP_TOKENS new tokens in one row (the widest attention), sampling every row."""
    tokens, device = settings.max_step_tokens, base.device

    @torch.inference_mode()
    def step() -> None:
        kv = KVCache(base.kv_shape, tokens + BLOCK_SIZE, device)
        slots = torch.arange(BLOCK_SIZE, BLOCK_SIZE + tokens, device=device)
        group = RowGroup(tokens=torch.arange(tokens, device=device), slots=slots,
                         query_positions=torch.arange(tokens, device=device)[None],
                         key_lengths=torch.tensor([tokens], device=device),
                         rows=1, queries=tokens, keys=tokens)
        step_attention = StepAttention(kv.keys, kv.values, slots, [group])
        runner = ModelRunner(base)
        embeds = runner.embed(torch.zeros(tokens, dtype=torch.long, device=device))
        logits_at = torch.arange(tokens - min(settings.max_rows, tokens), tokens, device=device)
        runner.forward(embeds, torch.arange(tokens, device=device), step_attention, logits_at)

    return _peak_beyond_now(device, step)


def _training_peak(base: BaseModel) -> int:
    """A training micro-step's forward and backward: a soft prompt's gradient through every layer."""
    device, rows, length = base.device, TRAIN_PROFILE_ROWS, TRAIN_PROFILE_TOKENS
    view: Any = training_view(base.model, checkpointed=True)  # a model, as its class types it

    def micro_step() -> None:
        with torch.enable_grad():
            embeds = base.model.get_input_embeddings()(torch.zeros(rows, length, dtype=torch.long, device=device))
            embeds = embeds.detach().requires_grad_()
            hidden = view.base_model(inputs_embeds=embeds, use_cache=False).last_hidden_state
            logits = base.model.get_output_embeddings()(hidden[:, -16:]).float()  # the target tokens' logits
            logits.logsumexp(-1).sum().backward()

    return _peak_beyond_now(device, micro_step)
