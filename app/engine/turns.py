"""Turn-taking on the engine's thread between serving and training work.

The engine's thread is the only one that computes on the model, so training work runs there too.
Inference has priority: a training work item starts when no inference work is left, and inside
it, at each pause point (between decoder layers, forward and backward), waiting inference runs
first, until none is left. A request arriving during training waits for the current stretch of
training only, never a whole step. Under sustained load training still progresses: once serving
has run SERVING_SHARE times the training budget since training last ran, and no request waits
for its first token, training gets one stretch (so at most a fifth of the model's time goes to
training while serving is busy). Used only from the engine's thread, but for `waiting`, which
training threads append to.
"""

import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import StrEnum

import torch

from app.engine.device import pausing, synchronize

SERVING_SHARE = 4


class Activity(StrEnum):
    """What the model is computing now."""

    INFERENCE = "inference"
    TRAINING = "training"


@dataclass(eq=False)
class TrainingItem:
    work: Callable[[], object]
    done: threading.Event = field(default_factory=threading.Event)
    outcome: tuple[bool, object] | None = None  # (True, result) or (False, exception)

    def settle(self, outcome: tuple[bool, object]) -> None:
        self.outcome = outcome
        self.done.set()


class Turns:
    def __init__(self, step_budget_s: float | None):
        self.step_budget_s = step_budget_s  # the longest training may hold the model while inference waits
        self.waiting: deque[TrainingItem] = deque()
        self.activity: Activity | None = None
        self.last_longest_piece_s = 0.0  # of the last item: its longest stretch between pause points
        self._training_ran_at = 0.0  # when the last stretch of training ended
        self.training_items = 0
        self.training_pieces = 0  # stretches of training between pause points, begun so far

    def training_due(self, awaiting_first_token: Callable[[], bool]) -> bool:
        """Whether training, while inference has work, gets its turn: serving has had the model for
        SERVING_SHARE budgets since training last ran, and no request waits for its first token."""
        if self.step_budget_s is None:
            return False
        served_for = time.perf_counter() - self._training_ran_at
        return served_for >= SERVING_SHARE * self.step_budget_s and not awaiting_first_token()

    def train(self, item: TrainingItem, model: torch.nn.Module, device: torch.device,
              serve_waiting: Callable[[], None]) -> None:
        """Run one training work item on `model`, calling `serve_waiting` at each of its pause
        points. Stretches of training are timed after a device synchronize: on CUDA a clock read
        alone would time kernel launches, not the work."""
        self.training_items += 1
        self.training_pieces += 1
        self.last_longest_piece_s = 0.0
        piece_started = time.perf_counter()

        def pause() -> None:
            nonlocal piece_started
            self._piece_ended(device, piece_started)
            serve_waiting()
            self.training_pieces += 1
            piece_started = time.perf_counter()

        self.activity = Activity.TRAINING
        try:
            # Backward on this thread (autograd would run CUDA's on threads of its own), pausing
            # wherever it runs.
            with torch.enable_grad(), torch.autograd.set_multithreading_enabled(False), pausing(model, pause):
                outcome = (True, item.work())
        except BaseException as exc:  # the work's own failure: its caller gets it
            outcome = (False, exc)
        finally:
            self.activity = None
        self._piece_ended(device, piece_started)
        item.settle(outcome)

    def _piece_ended(self, device: torch.device, piece_started: float) -> None:
        synchronize(device)
        self._training_ran_at = time.perf_counter()
        self.last_longest_piece_s = max(self.last_longest_piece_s, self._training_ran_at - piece_started)
