"""POST /generate: one completion with an optional soft-prompt adapter, whole or streamed."""

from contextlib import aclosing

from fastapi import APIRouter, HTTPException, Request, Response

from app.api.deps import RuntimeDep, invalid
from app.api.disconnect import unless_disconnected
from app.api.streaming import sse_response
from app.engine.core import EngineOverloaded, RequestTooLarge
from app.engine.engine import Completion, QueueFull, RequestStream, TooMuchWork
from app.engine.requests import GenerationRequest, SoftPrompt
from app.engine.text_stream import TextDeltas
from app.runtime import AdapterBaseMismatch, AdapterNotFound, Runtime
from app.datasets import render
from app.schemas import GenerateRequest, GenerateResponse, Usage

router = APIRouter(tags=["generate"])


def check_max_new_tokens(runtime: Runtime, value: int, field: str) -> None:
    if value > runtime.settings.max_new_tokens_limit:
        raise invalid(field, f"must be at most {runtime.settings.max_new_tokens_limit}")


async def adapter_soft_prompt(runtime: Runtime, adapter_id: str | None) -> tuple[SoftPrompt | None, str | None]:
    """The adapter's soft prompt and template; (None, None) for the base model."""
    if adapter_id is None:
        return None, None
    try:
        return await runtime.soft_prompt(adapter_id)
    except AdapterNotFound:
        raise HTTPException(404, detail=f"adapter {adapter_id!r} not found") from None
    except AdapterBaseMismatch as exc:
        raise HTTPException(409, detail=str(exc)) from None


def encode_prompt(runtime: Runtime, prompt: str) -> list[int]:
    prompt_ids = runtime.base.tokenizer(prompt).input_ids
    if len(prompt_ids) > runtime.settings.max_prompt_tokens:
        raise invalid("prompt", f"is {len(prompt_ids)} tokens, the limit is {runtime.settings.max_prompt_tokens}")
    return prompt_ids


async def build_request(runtime: Runtime, body: GenerateRequest) -> GenerationRequest:
    check_max_new_tokens(runtime, body.max_new_tokens, "max_new_tokens")
    soft_prompt, template = await adapter_soft_prompt(runtime, body.adapter_id)
    prompt = body.prompt
    if body.apply_template:
        if template is None:
            raise invalid("apply_template", "the adapter has no template (or no adapter was given)")
        prompt = render(template, prompt)
    return GenerationRequest(
        prompt_ids=encode_prompt(runtime, prompt),
        soft_prompt=soft_prompt,
        max_new_tokens=body.max_new_tokens,
        temperature=body.temperature,
        top_p=body.top_p,
        stop=body.stop,
        seed=body.seed,
    )


def _busy(detail: str = "server busy: generation queue is full") -> HTTPException:
    return HTTPException(503, detail=detail, headers={"Retry-After": "1"})


def _too_large(exc: RequestTooLarge, field: str) -> HTTPException:
    return invalid(field, f"{exc}: shorten the prompt or ask for fewer tokens")


async def run_all(
    runtime: Runtime, http_request: Request, requests: list[GenerationRequest], tokens_field: str = "max_new_tokens"
) -> list[Completion]:
    """Queue `requests` together and wait for them; a client that hangs up frees their rows."""
    try:
        submitted = runtime.engine.submit_all(requests, timeout=runtime.settings.request_timeout_s)
        return await unless_disconnected(http_request, submitted)
    except QueueFull:
        raise _busy() from None
    except RequestTooLarge as exc:
        raise _too_large(exc, tokens_field) from None
    except TooMuchWork as exc:
        raise invalid("prompt", f"{exc}: send fewer or shorter prompts, or ask for fewer tokens") from None
    except EngineOverloaded as exc:
        raise _busy(str(exc)) from None
    except TimeoutError:
        raise HTTPException(504, detail="generation did not finish before the request deadline") from None


def start_streams(
    runtime: Runtime, requests: list[GenerationRequest], tokens_field: str = "max_new_tokens"
) -> list[RequestStream]:
    """Queue streaming requests together; a full queue is still a plain 503, before any event is sent."""
    try:
        return runtime.engine.stream_all(requests, timeout=runtime.settings.request_timeout_s)
    except QueueFull:
        raise _busy() from None
    except RequestTooLarge as exc:
        raise _too_large(exc, tokens_field) from None
    except TooMuchWork as exc:
        raise invalid("prompt", f"{exc}: send fewer or shorter prompts, or ask for fewer tokens") from None


async def _generate_events(updates: RequestStream, request: GenerationRequest, adapter_id: str | None):
    deltas = TextDeltas(request.stop)
    async with aclosing(updates):
        async for update in updates:
            result = update.result
            text = deltas.next(result.text, update.finished)
            if update.finished:
                usage = Usage(prompt_tokens=result.prompt_tokens, completion_tokens=len(result.token_ids))
                yield {"text": text, "finish_reason": result.finish_reason, "usage": usage.model_dump(),
                       "adapter_id": adapter_id}
            elif text:
                yield {"text": text, "finish_reason": None}


@router.post(
    "/generate",
    response_model=GenerateResponse,
    responses={200: {"content": {"text/event-stream": {}}, "description": "The completion, or its event stream"},
               404: {"description": "Unknown adapter"}, 409: {"description": "Adapter made for another base model"},
               503: {"description": "Queue full; retry after Retry-After seconds"}},
)
async def generate(body: GenerateRequest, runtime: RuntimeDep, http_request: Request, response: Response):
    """Generate text. With `stream: true` the answer is `text/event-stream`: `data:` events with
    `text` pieces, a last event with `finish_reason` and `usage`, then `data: [DONE]`."""
    request = await build_request(runtime, body)
    if body.stream:
        [stream] = start_streams(runtime, [request])
        return sse_response(_generate_events(stream, request, body.adapter_id))
    [completion] = await run_all(runtime, http_request, [request])
    response.headers["X-Queue-Time"] = f"{completion.queue_seconds:.4f}"
    response.headers["X-Time-To-First-Token"] = f"{completion.first_token_seconds:.4f}"
    response.headers["X-Inference-Time"] = f"{completion.inference_seconds:.4f}"
    response.headers["X-Batch-Size"] = f"{completion.batch_size:.1f}"
    result = completion.result
    return GenerateResponse(
        text=result.text,
        finish_reason=result.finish_reason,
        usage=Usage(prompt_tokens=result.prompt_tokens, completion_tokens=len(result.token_ids)),
        adapter_id=body.adapter_id,
    )
