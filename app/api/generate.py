"""POST /generate: one completion with an optional soft-prompt adapter, whole or streamed."""

from contextlib import aclosing

from fastapi import APIRouter, Request, Response

from app.api.completion_service import adapter_soft_prompt, check_max_new_tokens, encode_prompt, run_all, start_streams
from app.api.deps import RuntimeDep, invalid
from app.api.streaming import sse_response
from app.datasets import render
from app.engine.engine import RequestStream
from app.engine.requests import GenerationRequest
from app.engine.text_stream import TextDeltas
from app.runtime import Runtime
from app.schemas import GenerateRequest, GenerateResponse, Usage

router = APIRouter(tags=["generate"])


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
               400: {"description": "The body is not JSON"},
               404: {"description": "Unknown adapter"}, 409: {"description": "Adapter made for another base model"},
               500: {"description": "The engine failed this request (the message carries the request id)"},
               503: {"description": "Queue full, memory short, or this node cannot serve; retry after Retry-After"},
               504: {"description": "Not finished before the request deadline"}},
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
