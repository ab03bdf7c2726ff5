"""`POST /v1/chat/completions`, OpenAI's chat API, whole or streamed. `model` is resolved as for
/v1/completions (an adapter id, a fine-tuned model's name, or the base model's name); the messages
are rendered by app.chat_template (the base model's own chat template, or the documented plain
one), the same rendering chat datasets are trained with, and the adapter's soft prompt (or prefix)
comes first. An adapter's completion `template` is not applied: the chat template lays the text
out. One choice per request (`n` is 1).
"""

import secrets
import time
from collections.abc import AsyncIterator
from typing import Annotated, Literal

from fastapi import APIRouter, Request
from jinja2 import TemplateError
from pydantic import BaseModel, ConfigDict, Field, StringConstraints, field_validator

from app import chat_template
from app.api.completion_service import check_max_new_tokens, run_all, start_streams
from app.api.deps import RuntimeDep, invalid
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
from app.engine.requests import GenerationRequest
from app.runtime import Runtime
from app.schemas import NoNul, valid_unicode

ContentText = Annotated[str, StringConstraints(max_length=100_000)]
# Chat parameters that change results and are not supported, with the values that ask for nothing.
NEUTRAL = {
    "n": (1,), "logprobs": (None, False), "top_logprobs": (None, 0), "presence_penalty": (0,),
    "frequency_penalty": (0,), "logit_bias": (None, {}), "tools": (None, []), "tool_choice": (None, "none", "auto"),
    "functions": (None, []), "function_call": (None, "none", "auto"), "response_format": (None, {"type": "text"}),
    "audio": (None,), "modalities": (None, ["text"]), "prediction": (None,), "web_search_options": (None,),
}


class TextPart(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    type: Literal["text"]
    text: ContentText

    _valid_unicode = field_validator("text", mode="before")(valid_unicode)


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    role: Literal["system", "developer", "user", "assistant"] = Field(
        description="`developer` is taken as `system`; tool and function messages are not supported")
    content: ContentText | Annotated[list[TextPart], Field(min_length=1)] = Field(
        description="Text, or a list of text parts (joined with newlines)")

    _valid_unicode = field_validator("content", mode="before")(valid_unicode)

    def as_template_input(self) -> dict[str, str]:
        content = self.content if isinstance(self.content, str) else chat_template.text_of([p.text for p in self.content])
        return {"role": self.role, "content": content}


class ChatCompletionRequest(BaseModel):
    # As CompletionRequest: JSON's own types, no NaN or Infinity, unknown fields ignored.
    model_config = ConfigDict(extra="ignore", strict=True, allow_inf_nan=False, json_schema_extra={"examples": [{
        "model": "3f9a1c2b7d4e", "messages": [{"role": "user", "content": "Is this review positive? A gripping film."}],
        "max_completion_tokens": 16, "temperature": 0,
    }]})

    model: Annotated[str, NoNul] = Field(max_length=200, description=(
        "An adapter id, a fine-tuned model's name (ft:...), or the base model's name (see GET /v1/models)"))
    messages: list[ChatMessage] = Field(min_length=1, max_length=1000)
    max_completion_tokens: int | None = Field(None, ge=1, description="Default: the node's MAX_NEW_TOKENS_LIMIT")
    max_tokens: int | None = Field(None, ge=1, description="The older name of max_completion_tokens")
    temperature: float = Field(1.0, ge=0.0, le=2.0, description="0 means greedy decoding (OpenAI's default is 1)")
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    stop: StopString | Annotated[list[StopString], Field(max_length=4)] | None = None
    seed: int | None = Field(None, ge=0, lt=2**63)
    stream: bool = Field(False, description="Send the reply as server-sent events as it is made")
    stream_options: StreamOptions | None = None
    n: int = 1
    logprobs: bool | None = None
    top_logprobs: int | None = None
    presence_penalty: float = 0
    frequency_penalty: float = 0
    logit_bias: dict[str, float] | None = None
    tools: list[dict] | None = None
    tool_choice: str | dict | None = None
    functions: list[dict] | None = None
    function_call: str | dict | None = None
    response_format: dict | None = None
    audio: dict | None = None
    modalities: list[str] | None = None
    prediction: dict | None = None
    web_search_options: dict | None = None

    _valid_unicode = field_validator("model", "stop", mode="before")(valid_unicode)
    _unsupported = refuse_unless_neutral(NEUTRAL)

    @property
    def stops(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else self.stop or []

    def tokens_asked(self) -> tuple[int | None, str]:
        """The reply's token limit as asked, and the field that asked it."""
        if self.max_completion_tokens is not None:
            return self.max_completion_tokens, "max_completion_tokens"
        return self.max_tokens, "max_tokens"


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str
    refusal: None = None


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    logprobs: None = None
    finish_reason: Literal["stop", "length"]


class ChatCompletion(BaseModel):
    model_config = ConfigDict(json_schema_extra={"examples": [{
        "id": "chatcmpl-5d0c6a1e9f2b4c8d7a3e1f60", "object": "chat.completion", "created": 1796014800,
        "model": "3f9a1c2b7d4e",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": "Yes, it is positive.", "refusal": None},
                     "logprobs": None, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 21, "completion_tokens": 6, "total_tokens": 27},
    }]})

    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: CompletionUsage


router = APIRouter(prefix="/v1", tags=["openai"], route_class=OpenAIErrorRoute)


def _prompt_ids(runtime: Runtime, messages: list[ChatMessage]) -> list[int]:
    tokenizer = runtime.base.tokenizer
    try:
        ids = chat_template.prompt_ids(tokenizer, [m.as_template_input() for m in messages])
    except TemplateError as exc:  # the model's own template refuses the conversation (roles out of turn...)
        raise invalid("messages", f"the model's chat template refuses them: {exc}") from None
    if len(ids) > runtime.settings.max_prompt_tokens:
        raise invalid("messages", f"are {len(ids)} tokens, the limit is {runtime.settings.max_prompt_tokens}")
    return ids


async def _request(runtime: Runtime, body: ChatCompletionRequest) -> tuple[GenerationRequest, str]:
    """The engine request, and the field that sets its token limit."""
    max_new_tokens, field = body.tokens_asked()
    if max_new_tokens is None:
        max_new_tokens = runtime.settings.max_new_tokens_limit
    check_max_new_tokens(runtime, max_new_tokens, field)
    soft_prompt = await model_soft_prompt(runtime, body.model)
    request = GenerationRequest(
        prompt_ids=_prompt_ids(runtime, body.messages), soft_prompt=soft_prompt, max_new_tokens=max_new_tokens,
        temperature=body.temperature, top_p=body.top_p, stop=body.stops, seed=body.seed,
    )
    return request, field


async def _chunks(head: dict, request: GenerationRequest, stream: RequestStream,
                  include_usage: bool) -> AsyncIterator[dict]:
    """OpenAI's chat.completion.chunk events: the assistant's role first, then its text in `delta`s
    as the row makes it, then an empty delta with the finish_reason; with `include_usage`, every
    chunk has `usage: null` and a last one, with no choices, the usage."""
    head = head | {"object": "chat.completion.chunk"} | ({"usage": None} if include_usage else {})

    def chunk(delta: dict, finish_reason: str | None = None) -> dict:
        return head | {"choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}]}

    yield chunk({"role": "assistant", "content": ""})
    async for _, text, result in text_pieces([request], [stream]):
        if text:
            yield chunk({"content": text})
        if result is not None:
            yield chunk({}, result.finish_reason)
            if include_usage:
                yield head | {"choices": [], "usage": usage([result]).model_dump()}


@router.post(
    "/chat/completions",
    response_model=ChatCompletion,
    responses=generation_responses("chat completion"),
)
async def create_chat_completion(body: ChatCompletionRequest, runtime: RuntimeDep, http_request: Request):
    """OpenAI's chat completions API: the assistant's reply to `messages`. With `stream: true` the
    answer is `text/event-stream`: `chat.completion.chunk` events whose `delta` carries the role,
    then the text, then an empty delta with the `finish_reason`, then `data: [DONE]`."""
    request, field = await _request(runtime, body)
    head = {"id": f"chatcmpl-{secrets.token_hex(12)}", "created": int(time.time()), "model": body.model}
    if body.stream:
        include_usage = body.stream_options is not None and body.stream_options.include_usage
        [stream] = start_streams(runtime, [request], field)
        return sse_response(_chunks(head, request, stream, include_usage))
    [completion] = await run_all(runtime, http_request, [request], field)
    result = completion.result
    choice = ChatChoice(index=0, message=AssistantMessage(content=result.text), finish_reason=result.finish_reason)
    return ChatCompletion(**head, choices=[choice], usage=usage([result]))
