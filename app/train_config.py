"""What a training job asks for: the hyperparameters the API validates and stores with the job,
and the worker's training loop reads back. Here in the core, so describing a job needs no worker code.

One model, several faces, as fastapi's full-stack template builds ItemCreate and ItemPublic from
ItemBase: `TrainConfigBase` holds what a client may set, with its bounds and the rules between
fields; `TrainConfig` is what a job runs with (stored as the job's `params`, read back by the
worker); the upload form (app.api.train_jobs.TrainJobForm) is the base with the files and a name.
A rule broken is a 422 naming the field (a field validator's error), as pydantic's own are."""

import math
from typing import Annotated, Literal, Self

from pydantic import BaseModel, Field, ValidationInfo, field_validator, model_validator
from pydantic_core import PydanticCustomError

from app.schemas import NoNul

InitMode = Literal["labels", "text", "vocab", "random"]
Method = Literal["prompt_tuning", "prefix_tuning"]
Schedule = Literal["constant", "linear"]
# Per method: prompt tuning's Adafactor at 0.3 (Lester et al.); prefix tuning's AdamW at 0.01
# (PEFT's and P-tuning v2's range for prefixes).
DEFAULT_LEARNING_RATES = {"prompt_tuning": 0.3, "prefix_tuning": 0.01}
DEFAULT_TEMPLATE = "{input}"
CHECKPOINT_MIN_TOKENS = 512


def broken_rule(message: str) -> PydanticCustomError:
    """A rule's error, with its message as it is (a ValueError's would be prefixed "Value error, ")."""
    return PydanticCustomError("value_error", message)


def eval_within_the_run(value: int, info: ValidationInfo) -> int:
    """A field validator for a client's own eval_every: at most its max_steps. Only a client's: a
    stored job, a test or a bench may evaluate less often than it steps (then only at the end)."""
    max_steps = info.data.get("max_steps")
    if max_steps is not None and value > max_steps:
        raise broken_rule(f"must be at most max_steps ({max_steps})")
    return value


class TrainConfigBase(BaseModel):
    # prompt_tuning learns input embeddings; prefix_tuning learns every layer's keys and values
    # (Li & Liang; P-tuning v2), through PEFT's reparameterization MLP when prefix_projection is on.
    method: Annotated[Method, Field(description=(
        "prompt_tuning: a soft prompt of input embeddings; prefix_tuning: every layer's keys and values"))] = (
        "prompt_tuning")
    prefix_projection: Annotated[bool, Field(description=(
        "prefix_tuning only: learn the prefix through PEFT's reparameterization MLP"))] = False
    num_virtual_tokens: Annotated[int, Field(ge=1, le=512)] = 20
    # Lester et al.: class-label init helps small models most. Prefix tuning starts from the keys
    # and values the model itself computes for that text (Li & Liang: real words' activations).
    init: InitMode = "labels"
    # Checked when left out too: init "text" needs it.
    init_text: Annotated[str | None, Field(max_length=2000, validate_default=True)] = None
    learning_rate: Annotated[float | None, Field(gt=0, le=10, description=(
        f"Default per method: {DEFAULT_LEARNING_RATES}"))] = None
    # linear: the rate falls to zero by the end of the run (its steps, or its time budget if that
    # ends it sooner), so the last steps settle instead of bouncing around the optimum.
    lr_schedule: Annotated[Schedule, Field(description=(
        "constant: the learning rate stays; linear: it falls to zero by the last step"))] = "constant"
    max_steps: Annotated[int | None, Field(ge=1, le=1_000_000)] = None
    epochs: Annotated[float | None, Field(gt=0, le=1000)] = None
    batch_size: Annotated[int, Field(ge=1, le=512)] = 8
    max_length: Annotated[int, Field(ge=8, le=8192)] = 128  # tokens of template + output, soft prompt excluded
    eval_every: Annotated[int, Field(ge=1, le=1_000_000, description="Steps between evaluations; at most max_steps")] = 100
    early_stopping_patience: Annotated[int, Field(ge=1, le=1000)] = 4  # evaluations without improvement
    seed: Annotated[int, Field(ge=0, le=2**31 - 1)] = 0
    # The template becomes the adapter's: NUL would fail its registration after training, on PostgreSQL.
    template: Annotated[str, Field(min_length=1, max_length=2000,
                                   description='Prompt layout, e.g. "Review: {input}\\nSentiment:"'),
                        NoNul] = DEFAULT_TEMPLATE
    # None = auto: recompute activations only for batches of CHECKPOINT_MIN_TOKENS or more, where
    # storing them would dominate memory. Small batches keep them, since there recomputing costs
    # much more time per step than the memory it saves is worth (figures: bench/README.md).
    gradient_checkpointing: Annotated[bool | None, Field(description="Default: on for batches of 512+ tokens")] = None

    # Each rule reads fields declared before the one it names (pydantic validates in that order).
    @field_validator("prefix_projection")
    @classmethod
    def _projection_needs_a_prefix(cls, value: bool, info: ValidationInfo) -> bool:
        if value and "method" in info.data and info.data["method"] != "prefix_tuning":
            raise broken_rule("applies to method prefix_tuning only")
        return value

    @field_validator("init_text")
    @classmethod
    def _text_init_needs_text(cls, value: str | None, info: ValidationInfo) -> str | None:
        if info.data.get("init") == "text" and not (value and value.strip()):
            raise broken_rule("is required when init is 'text'")
        return value

    @field_validator("epochs")
    @classmethod
    def _steps_or_epochs(cls, value: float | None, info: ValidationInfo) -> float | None:
        if value is not None and info.data.get("max_steps") is not None:
            raise broken_rule("give max_steps or epochs, not both")
        return value

    @field_validator("template")
    @classmethod
    def _template_has_the_input(cls, value: str) -> str:
        if "{input}" not in value:
            raise broken_rule("must contain {input}")
        return value


class TrainConfig(TrainConfigBase):
    """What a job runs with: the client's choices, the learning rate resolved, and what only the
    server and the benches set."""

    default_max_steps: int = 300  # when neither max_steps nor epochs is given
    time_budget_s: float | None = None  # stop (keeping the best prompt so far) after this long

    @model_validator(mode="after")
    def _method_learning_rate(self) -> Self:
        if self.learning_rate is None:
            self.learning_rate = DEFAULT_LEARNING_RATES[self.method]
        return self

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
        return self.model_dump()
