"""What a training job asks for: the hyperparameters the API validates and stores with the job,
and the worker's training loop reads back. Here in the core, so describing a job needs no worker code."""

import math
from dataclasses import asdict, dataclass
from typing import Literal

InitMode = Literal["labels", "text", "vocab", "random"]
Method = Literal["prompt_tuning", "prefix_tuning"]
Schedule = Literal["constant", "linear"]
# Per method: prompt tuning's Adafactor at 0.3 (Lester et al.); prefix tuning's AdamW at 0.01
# (PEFT's and P-tuning v2's range for prefixes).
DEFAULT_LEARNING_RATES = {"prompt_tuning": 0.3, "prefix_tuning": 0.01}
DEFAULT_TEMPLATE = "{input}"
CHECKPOINT_MIN_TOKENS = 512


@dataclass
class TrainConfig:
    # prompt_tuning learns input embeddings; prefix_tuning learns every layer's keys and values
    # (Li & Liang; P-tuning v2), through PEFT's reparameterization MLP when prefix_projection is on.
    method: Method = "prompt_tuning"
    prefix_projection: bool = False
    num_virtual_tokens: int = 20
    # Lester et al.: class-label init helps small models most. Prefix tuning starts from the keys
    # and values the model itself computes for that text (Li & Liang: real words' activations).
    init: InitMode = "labels"
    init_text: str | None = None
    learning_rate: float | None = None  # None: DEFAULT_LEARNING_RATES[method]
    # linear: the rate falls to zero by the end of the run (its steps, or its time budget if that
    # ends it sooner), so the last steps settle instead of bouncing around the optimum.
    lr_schedule: Schedule = "constant"
    max_steps: int | None = None
    epochs: float | None = None
    batch_size: int = 8
    max_length: int = 128  # tokens of template + output, soft prompt excluded
    eval_every: int = 100
    early_stopping_patience: int = 4  # evaluations without improvement
    seed: int = 0
    template: str = DEFAULT_TEMPLATE
    # None = auto: recompute activations only for batches of CHECKPOINT_MIN_TOKENS or more, where
    # storing them would dominate memory. Small batches keep them, since there recomputing costs
    # much more time per step than the memory it saves is worth (figures: bench/README.md).
    gradient_checkpointing: bool | None = None
    default_max_steps: int = 300  # when neither max_steps nor epochs is given
    time_budget_s: float | None = None  # stop (keeping the best prompt so far) after this long

    def __post_init__(self):
        if self.learning_rate is None:
            self.learning_rate = DEFAULT_LEARNING_RATES[self.method]

    def total_steps(self, train_examples: int) -> int:
        if self.max_steps is not None:
            return self.max_steps
        if self.epochs is not None:
            return max(1, math.ceil(self.epochs * train_examples / self.batch_size))
        return self.default_max_steps

    def learning_rate_at(self, step: int, total: int, elapsed_s: float) -> float:
        """The rate for `step` (from 1) of `total`, `elapsed_s` seconds into the run."""
        if self.lr_schedule == "constant":
            return self.learning_rate
        done = (step - 1) / total
        if self.time_budget_s is not None:
            done = max(done, elapsed_s / self.time_budget_s)
        return self.learning_rate * max(0.0, 1.0 - done)

    def to_dict(self) -> dict:
        return asdict(self)
