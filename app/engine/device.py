"""Who computes on the model: training hands its work to a `Device` instead of calling the model
itself, so that on a node that also serves, the engine's thread runs it between serving steps.

A training work item runs whole on the device's thread; inside it, the training code marks the
points (between decoder layers, forward and backward) where it can pause: there
`let_serving_run()` hands the device to waiting inference work, which has priority. On a node
that only trains, work runs in the caller's thread and the pause points do nothing.
"""

from collections.abc import Callable
from contextvars import ContextVar
from typing import Protocol, TypeVar

T = TypeVar("T")

_pause: ContextVar[Callable[[], None] | None] = ContextVar("softserve_pause", default=None)


class Device(Protocol):
    # The longest training may hold the device while inference waits; None: no bound (nothing serves).
    step_budget_s: float | None
    # Of the last work item run: the longest stretch between two pause points, in seconds.
    last_longest_piece_s: float

    def run(self, work: Callable[[], T]) -> T: ...


class InlineDevice:
    """A node that only trains: work runs at once, in the caller's thread."""

    step_budget_s = None
    last_longest_piece_s = 0.0

    def run(self, work: Callable[[], T]) -> T:
        return work()


def let_serving_run() -> None:
    """A pause point in training work: waiting inference runs now, if there is any."""
    pause = _pause.get()
    if pause is not None:
        pause()


def run_with_pauses(work: Callable[[], T], pause: Callable[[], None]) -> T:
    """Run `work`, calling `pause` at each of its pause points (the engine's side)."""
    token = _pause.set(pause)
    try:
        return work()
    finally:
        _pause.reset(token)
