"""API request and response bodies."""

from datetime import datetime
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator


class GenerateRequest(BaseModel):
    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [{"adapter_id": "3f9a1c2b7d4e", "prompt": "Review: a gripping, funny film\nSentiment:", "max_new_tokens": 4}]
        },
    )

    adapter_id: str | None = Field(None, max_length=64, description="Adapter to apply; null for the base model")
    prompt: str = Field(min_length=1, max_length=100_000)
    max_new_tokens: int = Field(64, ge=1)
    temperature: float = Field(0.0, ge=0.0, le=2.0, description="0 means greedy decoding")
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    stop: list[str] = Field(default_factory=list, max_length=8)
    seed: int | None = Field(None, ge=0, le=2**63 - 1)
    apply_template: bool = Field(False, description="Lay the prompt out with the adapter's training template")
    stream: bool = Field(False, description="Send tokens as server-sent events as they are made")

    @field_validator("stop")
    @classmethod
    def _stop_strings_not_empty(cls, value: list[str]) -> list[str]:
        if any(not s or len(s) > 200 for s in value):
            raise ValueError("each stop string must be 1..200 characters")
        return value


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int


class GenerateResponse(BaseModel):
    text: str
    finish_reason: Literal["stop", "length"]
    usage: Usage
    adapter_id: str | None


class AdapterOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: str
    name: str
    base_fingerprint: str
    num_virtual_tokens: int
    sha256: str
    size_bytes: int
    source: Literal["trained", "imported"]
    metrics: dict
    template: str | None
    created_at: datetime


class AdapterPage(BaseModel):
    items: list[AdapterOut]
    total: int
    limit: int
    offset: int


class Progress(BaseModel):
    step: int
    total_steps: int
    epoch: float


class JobError(BaseModel):
    code: str
    message: str


class TrainJobOut(BaseModel):
    id: str
    name: str
    status: Literal["queued", "running", "succeeded", "failed", "cancelled"]
    progress: Progress
    train_loss: float | None
    eval_loss: float | None
    eval_accuracy: float | None
    estimated_finish: datetime | None
    adapter_id: str | None
    error: JobError | None
    params: dict
    train_examples: int
    validation_examples: int
    attempts: int
    cancel_requested: bool
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None


class TrainJobPage(BaseModel):
    items: list[TrainJobOut]
    total: int
    limit: int
    offset: int


class JobEventOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: int
    kind: Literal["train", "eval", "message"]
    step: int
    data: dict
    created_at: datetime
