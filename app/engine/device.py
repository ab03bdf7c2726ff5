"""Who computes on the model: training hands its work to a `Device` instead of calling the model
itself, so that on a node that also serves, the engine's thread runs it between serving steps.

A training work item runs whole on the device's thread; inside it, the training code marks the
points (between decoder layers, forward and backward) where it can pause: there
`let_serving_run(model)` hands the device to waiting inference work, which has priority. On a node
that only trains, work runs in the caller's thread and the pause points do nothing.

The pause of a model whose training work is running is kept per model, readable from any thread,
not in a context variable: on CUDA, autograd runs backward (and its hooks, where half the pause
points are) on threads of its own, which would never see one. The engine also turns autograd's
device threads off while training work runs (see app.engine.turns), so backward stays on its thread.
"""

import threading
from collections.abc import Callable
from contextlib import contextmanager
from typing import Protocol, TypeVar

import torch

T = TypeVar("T")

_pauses: dict[int, Callable[[], None]] = {}  # id(model) -> the pause of its training work running now
_pauses_lock = threading.Lock()


class Device(Protocol):
    # The longest training may hold the device while inference waits; None: no bound (nothing serves).
    step_budget_s: float | None
    # Of the last work item run: the longest stretch between two pause points, in seconds.
    last_longest_piece_s: float
    # Whether it serves: then generation (an evaluation's) goes through its serving queue and pool
    # (`generate`); otherwise through a pool of its own, for that generation only.
    serves: bool

    def run_training_work(self, work: Callable[[], T]) -> T: ...

    def generate(self, requests: list, timeout: float = ...) -> list: ...


class InlineDevice:
    """A node that only trains: work runs at once, in the caller's thread."""

    step_budget_s: float | None = None
    last_longest_piece_s = 0.0
    serves = False

    def run_training_work(self, work: Callable[[], T]) -> T:
        return work()

    def generate(self, requests: list, timeout: float = 0.0) -> list:
        raise NotImplementedError("nothing serves here: generate through a pool of its own (generate_batch)")


def let_serving_run(model: torch.nn.Module) -> None:
    """A pause point in training work on `model`: waiting inference runs now, if there is any.
    Any thread may reach it (CUDA's backward runs hooks on autograd's own threads)."""
    pause = _pauses.get(id(model))
    if pause is not None:
        pause()


@contextmanager
def pausing(model: torch.nn.Module, pause: Callable[[], None]):
    """While the block runs, pause points of training work on `model` call `pause` (the engine's side)."""
    with _pauses_lock:
        if id(model) in _pauses:
            raise RuntimeError("training work is already running on this model")
        _pauses[id(model)] = pause
    try:
        yield
    finally:
        with _pauses_lock:
            del _pauses[id(model)]


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work: CUDA runs kernels after their launch returns, so a clock
    read without this times the launches, not the work."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
