"""Run a batch of requests synchronously through an engine of their own (training evaluation,
tests and benchmarks); the server runs them through the shared `Engine` instead."""

from collections.abc import Sequence

import torch

from app.engine.core import EngineCore
from app.engine.device import Device, InlineDevice
from app.engine.loader import BaseModel
from app.engine.requests import GenerationRequest, GenerationResult


def _engine_for(base: BaseModel, requests: Sequence[GenerationRequest], max_step_tokens: int = 512):
    # A pool that holds every row at once, so the whole batch runs together.
    tokens = sum(r.virtual_tokens + len(r.prompt_ids) + r.max_new_tokens for r in requests)
    return EngineCore(base, kv_tokens=tokens + 16 * len(requests), max_rows=max(len(requests), 1),
                      max_step_tokens=max_step_tokens)


def generate_batch(base: BaseModel, requests: Sequence[GenerationRequest], device: Device = InlineDevice(),
                   max_step_tokens: int = 512) -> list[GenerationResult]:
    """Run `requests` through an engine of their own until all have finished: each of its steps
    is a work item for `device`."""

    @torch.inference_mode()
    def start():
        core = _engine_for(base, requests, max_step_tokens)
        return core, [core.add(request) for request in requests]

    @torch.inference_mode()
    def step():
        if core.has_work():
            core.step()
        return core.has_work()

    core, rows = device.run_training_work(start)
    while device.run_training_work(step):
        pass
    for row in rows:
        if row.error is not None:
            raise row.error
    return [row.result for row in rows]


@torch.inference_mode()
def first_step_logits(base: BaseModel, requests: Sequence[GenerationRequest]) -> torch.Tensor:
    """The next-token logits [batch, vocab] the engine samples each request's first token from."""
    core = _engine_for(base, requests)
    rows = [core.add(request) for request in requests]
    first: dict[int, torch.Tensor] = {}

    def keep_first(sampled_rows, logits):
        for row, row_logits in zip(sampled_rows, logits):
            first.setdefault(id(row), row_logits.clone())

    core.logits_hook = keep_first
    while len(first) < len(rows) and core.has_work():
        core.step()
    for row in rows:
        if row.error is not None:
            raise row.error
    return torch.stack([first[id(row)] for row in rows])
