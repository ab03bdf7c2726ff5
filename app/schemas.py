"""API request and response bodies."""

import re
from datetime import datetime
from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, field_validator
from pydantic_core import PydanticCustomError

from app.job_status import JobStatus

SURROGATE = re.compile("[\ud800-\udfff]")


def valid_unicode(value):
    """A before-validator for text fields (a string or a list of them). JSON's "\\ud800" escapes
    give lone surrogates, which are not text: the tokenizer, UTF-8 and the database refuse them.
    pydantic itself refuses them only in strings with length limits, and unclearly."""
    for text in value if isinstance(value, list) else [value]:
        if isinstance(text, str) and SURROGATE.search(text):
            raise PydanticCustomError(
                "string_unicode", "Input should be valid Unicode: it holds an unpaired surrogate (\\ud800 to \\udfff)")
    return value


def _no_nul(value: str | None) -> str | None:
    if value is not None and "\x00" in value:
        raise PydanticCustomError("string_nul", "Input should not contain NUL characters (\\u0000)")
    return value


# For text stored in or looked up in the database: PostgreSQL text cannot hold NUL (a 500 there),
# so it is refused on every database alike.
NoNul = AfterValidator(_no_nul)


class GenerateRequest(BaseModel):
    model_config = ConfigDict(
        extra="forbid",
        strict=True,  # JSON's types as they are: no "5" or true for a number, no "yes" for a boolean
        allow_inf_nan=False,  # json reads NaN and Infinity; no field here means them
        json_schema_extra={
            "examples": [{"adapter_id": "3f9a1c2b7d4e", "prompt": "Review: a gripping, funny film\nSentiment:",
                          "max_new_tokens": 4}]
        },
    )

    adapter_id: Annotated[str | None, NoNul] = Field(None, max_length=64, description="Adapter to apply; null for the base model")
    prompt: str = Field(min_length=1, max_length=100_000)
    max_new_tokens: int = Field(64, ge=1)
    temperature: float = Field(0.0, ge=0.0, le=2.0, description="0 means greedy decoding")
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    stop: list[str] = Field(default_factory=list, max_length=8)
    seed: int | None = Field(None, ge=0, lt=2**63)  # int64; 2**63 is exact in JSON's doubles, 2**63 - 1 is not
    apply_template: bool = Field(False, description="Lay the prompt out with the adapter's training template")
    stream: bool = Field(False, description="Send tokens as server-sent events as they are made")

    _valid_unicode = field_validator("adapter_id", "prompt", "stop", mode="before")(valid_unicode)

    @field_validator("stop")
    @classmethod
    def _stop_strings_not_empty(cls, value: list[str]) -> list[str]:
        if any(not s or len(s) > 200 for s in value):
            raise ValueError("each stop string must be 1..200 characters")
        return value


ADAPTER_EXAMPLE = {
    "id": "3f9a1c2b7d4e", "name": "sst2-sentiment", "base_fingerprint": "gemma-3-270m@03110e641bfd72b2",
    "num_virtual_tokens": 20, "sha256": "9b1d4c0e8f2a7b6c5d4e3f2a1b0c9d8e7f6a5b4c3d2e1f0a9b8c7d6e5f4a3b2c",
    "size_bytes": 52640, "source": "trained",
    "metrics": {"eval_accuracy": 0.884, "eval_loss": 0.318, "steps": 425, "best_step": 400, "duration_s": 880.4},
    "template": "Review: {input}\nSentiment:", "created_at": "2026-11-29T06:00:00Z",
}
JOB_EXAMPLE = {
    "id": "a41c9e2f0b7d", "name": "sst2-sentiment", "status": "running",
    "progress": {"step": 120, "total_steps": 300, "epoch": 0.48}, "train_loss": 0.412, "eval_loss": 0.365,
    "eval_accuracy": 0.86, "estimated_finish": "2026-11-29T06:14:00Z", "adapter_id": None, "error": None,
    "params": {"num_virtual_tokens": 20, "learning_rate": 0.3, "max_steps": 300, "template": "Review: {input}\nSentiment:"},
    "train_examples": 2000, "validation_examples": 200, "attempts": 1, "cancel_requested": False, "pause_requested": False,
    "created_at": "2026-11-29T06:00:00Z", "started_at": "2026-11-29T06:00:02Z", "finished_at": None,
}


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int


class GenerateResponse(BaseModel):
    model_config = ConfigDict(json_schema_extra={"examples": [{
        "text": " positive", "finish_reason": "stop", "usage": {"prompt_tokens": 12, "completion_tokens": 1},
        "adapter_id": "3f9a1c2b7d4e",
    }]})

    text: str
    finish_reason: Literal["stop", "length"]
    usage: Usage
    adapter_id: str | None


class AdapterOut(BaseModel):
    model_config = ConfigDict(from_attributes=True, json_schema_extra={"examples": [ADAPTER_EXAMPLE]})

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
    model_config = ConfigDict(
        json_schema_extra={"examples": [{"items": [ADAPTER_EXAMPLE], "total": 1, "limit": 20, "offset": 0}]})

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
    model_config = ConfigDict(json_schema_extra={"examples": [JOB_EXAMPLE]})

    id: str
    name: str
    status: JobStatus
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
    pause_requested: bool
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None


class TrainJobPage(BaseModel):
    model_config = ConfigDict(json_schema_extra={"examples": [{"items": [JOB_EXAMPLE], "total": 1, "limit": 20, "offset": 0}]})

    items: list[TrainJobOut]
    total: int
    limit: int
    offset: int


class JobEventOut(BaseModel):
    model_config = ConfigDict(from_attributes=True, json_schema_extra={"examples": [
        {"id": 7, "kind": "train", "step": 20, "data": {"loss": 0.52, "epoch": 0.08}, "created_at": "2026-11-29T06:01:10Z"},
        {"id": 8, "kind": "eval", "step": 100, "data": {"loss": 0.37, "accuracy": 0.85}, "created_at": "2026-11-29T06:03:40Z"},
    ]})

    id: int
    kind: Literal["train", "eval", "message"]
    step: int
    data: dict
    created_at: datetime


class JobCheckpointOut(BaseModel):
    model_config = ConfigDict(from_attributes=True, json_schema_extra={"examples": [
        {"id": "ftckpt-7c1e04a9b2d3", "job_id": "a41c9e2f0b7d", "adapter_id": "7c1e04a9b2d3", "step": 100,
         "metrics": {"step": 100, "train_loss": 0.41, "eval_loss": 0.37, "eval_accuracy": 0.85},
         "created_at": "2026-11-29T06:03:41Z"},
    ]})

    id: str
    job_id: str
    adapter_id: str = Field(description="Servable at once: use it as the adapter id (or model) anywhere")
    step: int
    metrics: dict
    created_at: datetime


class HealthOut(BaseModel):
    model_config = ConfigDict(json_schema_extra={"examples": [{
        "status": "ok", "problem": None, "base_model": "gemma-3-270m", "fingerprint": "gemma-3-270m@03110e641bfd72b2",
        "quantization": "int8", "compute_dtype": "float32", "int8_kernels": "cpu: torch._int_mm",
        "device": "cpu", "queue_depth": 0,
        "engine": {
            "running": 5, "waiting": 0, "steps": 1840, "tokens_generated": 21093, "rows_shed": 0, "faults": 0,
            "queue_depth": 0, "requests_cancelled": 2, "training_items": 412, "training_active": False,
            "kv_cache": {"capacity_tokens": 16384, "used_tokens": 1024, "reserved_tokens": 608, "usage": 0.1,
                         "block_size": 16, "bytes_per_token": 36864, "capacity_bytes": 603979776},
            "prefix_cache": {"entries": 3, "tokens": 126, "capacity_tokens": 4096, "bytes": 4644864, "hits": 37,
                             "misses": 3, "hit_rate": 0.925, "reused_tokens": 851},
        },
        "adapter_cache": {"size": 3, "capacity": 64, "hits": 41, "misses": 3, "hit_rate": 0.93},
    }]})

    status: Literal["ok", "unavailable"]
    problem: str | None = Field(None, description="Why the engine cannot serve; null while it can")
    base_model: str
    fingerprint: str
    quantization: str
    compute_dtype: str = Field(description="The dtype of everything not int8: activations, KV cache, norms")
    int8_kernels: str = Field(description="What computes the int8 products")
    device: str
    queue_depth: int
    engine: dict = Field(description="Rows running and waiting, steps, KV cache and prefix cache use")
    adapter_cache: dict


class WebhookDeliveryOut(BaseModel):
    model_config = ConfigDict(json_schema_extra={"examples": [{
        "id": "msg_5b1f0c9e7a2d4b6c8e0f1a3b", "event_type": "fine_tuning.job.succeeded",
        "url": "https://hooks.example.com", "status": "delivered", "attempts": 2,
        "next_attempt_at": "2026-11-29T06:04:10Z", "last_error": None, "created_at": "2026-11-29T06:03:59Z",
        "delivered_at": "2026-11-29T06:04:10Z",
    }]})

    id: str = Field(description="Its `webhook-id` header: the same on every attempt")
    event_type: str
    url: str = Field(description="The target's origin (its path and query may carry a token: not shown)")
    status: Literal["pending", "delivered", "failed"] = Field(description="failed: given up")
    attempts: int
    next_attempt_at: datetime = Field(description="While pending, when it is tried again")
    last_error: str | None
    created_at: datetime
    delivered_at: datetime | None
