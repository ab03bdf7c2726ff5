"""What the OpenAI-shaped generation routes (/v1/completions, /v1/chat/completions) share: their
common fields, the refusal of parameters softserve cannot honour, usage, and the text pieces a
stream sends. A service module, so neither router imports the other."""

import json
from collections.abc import AsyncIterator, Sequence
from contextlib import aclosing
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, ValidationInfo, field_validator

from app.api.completion_service import adapter_soft_prompt
from app.api.streaming import merge
from app.engine.engine import RequestStream
from app.engine.requests import GenerationRequest, GenerationResult, SoftPrompt
from app.engine.text_stream import TextDeltas
from app.model_names import adapter_for_model
from app.runtime import Runtime

StopString = Annotated[str, StringConstraints(min_length=1, max_length=200)]


class StreamOptions(BaseModel):
    model_config = ConfigDict(strict=True)

    include_usage: bool = Field(False, description="Send a last chunk with `usage` and no choices")


class CompletionUsage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


def refuse_unless_neutral(neutral: dict[str, tuple]):
    """A validator for the fields `neutral` names: OpenAI parameters that change results and are
    not supported, each allowed only with one of the values that ask for nothing (clients often
    send those explicitly)."""

    def check(cls, value, info: ValidationInfo):
        allowed = neutral[info.field_name]
        if value not in allowed:
            raise ValueError(f"is not supported: send {' or '.join(map(json.dumps, allowed))}, or leave it out")
        return value

    return field_validator(*neutral)(check)


async def model_soft_prompt(runtime: Runtime, model: str) -> SoftPrompt | None:
    """The soft prompt (or prefix) of the adapter an OpenAI `model` names; None for the base model.
    404 for an unknown adapter, 409 for one made for another base model."""
    soft_prompt, _ = await adapter_soft_prompt(runtime, adapter_for_model(model, runtime.base.name))
    return soft_prompt


def usage(results: Sequence[GenerationResult]) -> CompletionUsage:
    prompt_tokens = sum(r.prompt_tokens for r in results)
    completion_tokens = sum(len(r.token_ids) for r in results)
    return CompletionUsage(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                           total_tokens=prompt_tokens + completion_tokens)


async def text_pieces(
    requests: Sequence[GenerationRequest], streams: list[RequestStream]
) -> AsyncIterator[tuple[int, str, GenerationResult | None]]:
    """(index of the request, new text, its result once it finished, else None) as the rows make
    text: only text safe to send (see TextDeltas), and a row's last piece, empty or not."""
    deltas = [TextDeltas(request.stop) for request in requests]
    async with aclosing(merge(streams)) as updates:
        async for index, update in updates:
            text = deltas[index].next(update.result.text, update.finished)
            if text or update.finished:
                yield index, text, update.result if update.finished else None


def generation_responses(what: str) -> dict:
    """The answers an OpenAI generation route documents besides its body: the same for every one."""
    return {200: {"content": {"text/event-stream": {}}, "description": f"The {what}, or its event stream"},
            400: {"description": "The body is not JSON"},
            404: {"description": "Unknown model"}, 409: {"description": "Adapter made for another base model"},
            500: {"description": "The engine failed this request (the message carries the request id)"},
            503: {"description": "Queue full, memory short, or this node cannot serve; retry after Retry-After"},
            504: {"description": "Not finished before the request deadline"}}
