"""POST /generate: one completion with an optional soft-prompt adapter."""

from fastapi import APIRouter, HTTPException, Response

from app.api.deps import RuntimeDep
from app.engine.generation import GenerationRequest
from app.engine.scheduler import Completion, QueueFull
from app.runtime import AdapterBaseMismatch, AdapterNotFound, Runtime
from app.datasets import render
from app.schemas import GenerateRequest, GenerateResponse, Usage

router = APIRouter(tags=["generate"])


def _invalid(field: str, message: str) -> HTTPException:
    """A 422 shaped like FastAPI's own validation errors, naming the field."""
    return HTTPException(422, detail=[{"loc": ["body", field], "msg": message, "type": "value_error"}])


async def build_request(runtime: Runtime, body: GenerateRequest) -> GenerationRequest:
    settings = runtime.settings
    if body.max_new_tokens > settings.max_new_tokens_limit:
        raise _invalid("max_new_tokens", f"must be at most {settings.max_new_tokens_limit}")
    soft_prompt, template = None, None
    if body.adapter_id is not None:
        try:
            soft_prompt, template = await runtime.soft_prompt(body.adapter_id)
        except AdapterNotFound:
            raise HTTPException(404, detail=f"adapter {body.adapter_id!r} not found") from None
        except AdapterBaseMismatch as exc:
            raise HTTPException(409, detail=str(exc)) from None
    prompt = body.prompt
    if body.apply_template:
        if template is None:
            raise _invalid("apply_template", "the adapter has no template (or no adapter was given)")
        prompt = render(template, prompt)
    prompt_ids = runtime.base.tokenizer(prompt).input_ids
    if len(prompt_ids) > settings.max_prompt_tokens:
        raise _invalid("prompt", f"is {len(prompt_ids)} tokens, the limit is {settings.max_prompt_tokens}")
    return GenerationRequest(
        prompt_ids=prompt_ids,
        soft_prompt=soft_prompt,
        max_new_tokens=body.max_new_tokens,
        temperature=body.temperature,
        top_p=body.top_p,
        stop=body.stop,
        seed=body.seed,
    )


async def run(runtime: Runtime, request: GenerationRequest) -> Completion:
    try:
        return await runtime.scheduler.submit(request, timeout=runtime.settings.request_timeout_s)
    except QueueFull:
        raise HTTPException(503, detail="server busy: generation queue is full", headers={"Retry-After": "1"}) from None
    except TimeoutError:
        raise HTTPException(504, detail="generation did not finish before the request deadline") from None


@router.post(
    "/generate",
    response_model=GenerateResponse,
    responses={404: {"description": "Unknown adapter"}, 409: {"description": "Adapter made for another base model"},
               503: {"description": "Queue full; retry after Retry-After seconds"}},
)
async def generate(body: GenerateRequest, runtime: RuntimeDep, response: Response) -> GenerateResponse:
    completion = await run(runtime, await build_request(runtime, body))
    response.headers["X-Queue-Time"] = f"{completion.queue_seconds:.4f}"
    response.headers["X-Inference-Time"] = f"{completion.inference_seconds:.4f}"
    response.headers["X-Batch-Size"] = str(completion.batch_size)
    result = completion.result
    return GenerateResponse(
        text=result.text,
        finish_reason=result.finish_reason,
        usage=Usage(prompt_tokens=result.prompt_tokens, completion_tokens=len(result.token_ids)),
        adapter_id=body.adapter_id,
    )
