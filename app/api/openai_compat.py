"""OpenAI-compatible routes, so OpenAI clients and tools work unchanged: `POST /v1/completions`
(whole or streamed) and `GET /v1/models`. `model` is an adapter id, a fine-tuned model's name
(app.model_names), or the base model's name.

Errors come in OpenAI's shape, {"error": {"message", "type", "param", "code"}}, with the same
status codes as /generate; OpenAI fields softserve cannot honour (`n`, `logprobs`, penalties...)
are refused with 422 unless they ask for nothing, and fields it does not know are ignored.
"""

import secrets
import time
from collections.abc import AsyncIterator
from typing import Annotated, Literal

from fastapi import APIRouter, Request
from pydantic import BaseModel, ConfigDict, Field, StringConstraints, field_validator
from sqlalchemy import select

from app import registry
from app.api.completion_service import check_max_new_tokens, encode_prompt, run_all, start_streams
from app.api.deps import RuntimeDep, SessionDep, invalid
from app.api.openai_common import (
    CompletionUsage,
    StopString,
    StreamOptions,
    generation_responses,
    model_soft_prompt,
    refuse_unless_neutral,
    text_pieces,
    usage,
)
from app.api.openai_errors import OpenAIErrorRoute
from app.api.streaming import sse_response
from app.engine.engine import RequestStream
from app.engine.requests import GenerationRequest, GenerationResult
from app.model_names import fine_tuned_model
from app.models import Adapter, TrainJob
from app.runtime import Runtime
from app.schemas import NoNul, valid_unicode

OWNER = "softserve"

PromptText = Annotated[str, StringConstraints(min_length=1, max_length=100_000)]
# OpenAI parameters that change results and are not supported, with the values that ask for
# nothing: clients often send those explicitly.
NEUTRAL = {
    "n": (1,), "best_of": (None, 1), "logprobs": (None,), "echo": (False,), "suffix": (None, ""),
    "presence_penalty": (0,), "frequency_penalty": (0,), "logit_bias": (None, {}),
}


class CompletionRequest(BaseModel):
    # allow_inf_nan: json reads NaN and Infinity; no field here means them.
    # strict: JSON's types as they are (no "5" or 1.0 for an integer, no "yes" for a boolean).
    model_config = ConfigDict(extra="ignore", strict=True, allow_inf_nan=False, json_schema_extra={"examples": [{
        "model": "3f9a1c2b7d4e", "prompt": "Review: a gripping, funny film\nSentiment:", "max_tokens": 4,
        "temperature": 0, "stop": ["\n"],
    }]})

    model: Annotated[str, NoNul] = Field(
        max_length=200, description=(
            "An adapter id, a fine-tuned model's name (ft:...), or the base model's name (see GET /v1/models)"))
    prompt: PromptText | Annotated[list[PromptText], Field(min_length=1)] = Field(
        description="A prompt, or a list of prompts: one choice each, generated in the same batch"
    )
    max_tokens: int = Field(16, ge=1)
    temperature: float = Field(1.0, ge=0.0, le=2.0, description="0 means greedy decoding (OpenAI's default is 1)")
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    stop: StopString | Annotated[list[StopString], Field(max_length=4)] | None = None
    seed: int | None = Field(None, ge=0, lt=2**63)  # int64; 2**63 is exact in JSON's doubles, 2**63 - 1 is not
    stream: bool = Field(False, description="Send the text as server-sent events as it is made")
    stream_options: StreamOptions | None = None
    n: int = 1
    best_of: int | None = None
    logprobs: int | None = None
    echo: bool = False
    suffix: str | None = None
    presence_penalty: float = 0
    frequency_penalty: float = 0
    logit_bias: dict[str, float] | None = None

    _valid_unicode = field_validator("model", "prompt", "stop", mode="before")(valid_unicode)
    _unsupported = refuse_unless_neutral(NEUTRAL)

    @property
    def prompts(self) -> list[str]:
        return [self.prompt] if isinstance(self.prompt, str) else self.prompt

    @property
    def stops(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else self.stop or []


class CompletionChoice(BaseModel):
    text: str
    index: int
    logprobs: None = None
    finish_reason: Literal["stop", "length"] | None


class CompletionResponse(BaseModel):
    model_config = ConfigDict(json_schema_extra={"examples": [{
        "id": "cmpl-5d0c6a1e9f2b4c8d7a3e1f60", "object": "text_completion", "created": 1796014800,
        "model": "3f9a1c2b7d4e",
        "choices": [{"text": " positive", "index": 0, "logprobs": None, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 12, "completion_tokens": 1, "total_tokens": 13},
    }]})

    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: CompletionUsage


class ModelOut(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = Field(description="Unix time; 0 for the base model")
    owned_by: str


class ModelList(BaseModel):
    model_config = ConfigDict(json_schema_extra={"examples": [{"object": "list", "data": [
        {"id": "gemma-3-270m", "object": "model", "created": 0, "owned_by": OWNER},
        {"id": "3f9a1c2b7d4e", "object": "model", "created": 1796014800, "owned_by": OWNER},
    ]}]})

    object: Literal["list"] = "list"
    data: list[ModelOut]


router = APIRouter(prefix="/v1", tags=["openai"], route_class=OpenAIErrorRoute)


async def _requests(runtime: Runtime, body: CompletionRequest) -> list[GenerationRequest]:
    check_max_new_tokens(runtime, body.max_tokens, "max_tokens")
    if len(body.prompts) > runtime.settings.max_queue_size:  # could never fit the queue: not worth a retry
        raise invalid("prompt", f"has {len(body.prompts)} prompts, more than the queue holds ({runtime.settings.max_queue_size})")
    soft_prompt = await model_soft_prompt(runtime, body.model)
    return [
        GenerationRequest(
            prompt_ids=encode_prompt(runtime, prompt), soft_prompt=soft_prompt, max_new_tokens=body.max_tokens,
            temperature=body.temperature, top_p=body.top_p, stop=body.stops, seed=body.seed,
        )
        for prompt in body.prompts
    ]


async def _chunks(
    head: dict, requests: list[GenerationRequest], streams: list[RequestStream], include_usage: bool
) -> AsyncIterator[dict]:
    """OpenAI's stream chunks: text pieces by choice index as the rows make them, each choice's
    last with its finish_reason; with `include_usage`, a last chunk with usage and no choices."""
    head = head | ({"usage": None} if include_usage else {})
    results: list[GenerationResult] = []
    async for index, text, result in text_pieces(requests, streams):
        if result is not None:
            results.append(result)
        reason = None if result is None else result.finish_reason
        yield head | {"choices": [CompletionChoice(text=text, index=index, finish_reason=reason).model_dump()]}
    if include_usage:
        yield head | {"choices": [], "usage": usage(results).model_dump()}


@router.post(
    "/completions",
    response_model=CompletionResponse,
    responses=generation_responses("completion"),
)
async def create_completion(body: CompletionRequest, runtime: RuntimeDep, http_request: Request):
    """OpenAI's legacy completions API. With `stream: true` the answer is `text/event-stream`:
    `text_completion` chunks, each choice's last with its `finish_reason`, then `data: [DONE]`."""
    requests = await _requests(runtime, body)
    head = {"id": f"cmpl-{secrets.token_hex(12)}", "object": "text_completion", "created": int(time.time()),
            "model": body.model}
    if body.stream:
        include_usage = body.stream_options is not None and body.stream_options.include_usage
        return sse_response(_chunks(head, requests, start_streams(runtime, requests, "max_tokens"), include_usage))
    results = [completion.result for completion in await run_all(runtime, http_request, requests, "max_tokens")]
    choices = [CompletionChoice(text=r.text, index=i, finish_reason=r.finish_reason) for i, r in enumerate(results)]
    return CompletionResponse(**head, choices=choices, usage=usage(results))


@router.get("/models", response_model=ModelList)
def list_models(runtime: RuntimeDep, session: SessionDep) -> ModelList:
    """The base model, then every adapter made for it, newest first: each `id` is a valid `model`.
    An adapter a training job made is listed again by its fine-tuned name (ft:...), after its id.
    Checkpoints are left out, as from GET /adapters: a job's checkpoints list lists them."""
    base = runtime.base
    adapters = session.execute(
        select(Adapter, TrainJob.id, TrainJob.suffix).outerjoin(TrainJob, TrainJob.adapter_id == Adapter.id)
        .where(Adapter.base_fingerprint == base.fingerprint, Adapter.source != registry.CHECKPOINT)
        .order_by(Adapter.created_at.desc(), Adapter.id.desc())
    ).all()
    models = [ModelOut(id=base.name, created=0, owned_by=OWNER)]
    for adapter, job_id, suffix in adapters:
        created = int(adapter.created_at.timestamp())
        models.append(ModelOut(id=adapter.id, created=created, owned_by=OWNER))
        if job_id is not None:
            models.append(ModelOut(id=fine_tuned_model(base.name, suffix, adapter.id), created=created, owned_by=OWNER))
    return ModelList(data=models)
