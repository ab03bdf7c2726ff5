"""The steps of a completion that /generate and /v1/completions share: the adapter's soft prompt,
the request's limits, and queueing on the engine, whose refusals become HTTP errors. A service
module, so neither router imports the other."""

import logging

from fastapi import HTTPException, Request

from app.adapter_resolver import AdapterBaseMismatch, AdapterNotFound
from app.api.deps import invalid
from app.api.disconnect import unless_disconnected
from app.api.errors import public_message
from app.engine.core import EngineFault, EngineOverloaded, RequestTooLarge, RowFailed
from app.engine.engine import Completion, EngineBroken, QueueFull, RequestStream, TooMuchWork
from app.engine.requests import GenerationRequest, SoftPrompt
from app.observability import note_adapter
from app.runtime import Runtime

log = logging.getLogger(__name__)


def check_max_new_tokens(runtime: Runtime, value: int, field: str) -> None:
    if value > runtime.settings.max_new_tokens_limit:
        raise invalid(field, f"must be at most {runtime.settings.max_new_tokens_limit}")


async def adapter_soft_prompt(runtime: Runtime, adapter_id: str | None) -> tuple[SoftPrompt | None, str | None]:
    """The adapter's soft prompt and template; (None, None) for the base model."""
    note_adapter(adapter_id)
    if adapter_id is None:
        return None, None
    try:
        return await runtime.adapter_resolver.soft_prompt(adapter_id)
    except AdapterNotFound:
        raise HTTPException(404, detail=f"adapter {adapter_id!r} not found") from None
    except AdapterBaseMismatch as exc:
        raise HTTPException(409, detail=str(exc)) from None



def encode_prompt(runtime: Runtime, prompt: str) -> list[int]:
    prompt_ids = runtime.base.tokenizer(prompt).input_ids
    if len(prompt_ids) > runtime.settings.max_prompt_tokens:
        raise invalid("prompt", f"is {len(prompt_ids)} tokens, the limit is {runtime.settings.max_prompt_tokens}")
    return prompt_ids


def _busy(detail: str = "server busy: generation queue is full") -> HTTPException:
    return HTTPException(503, detail=detail, headers={"Retry-After": "1"})


def _not_queued(exc: QueueFull | RequestTooLarge | TooMuchWork | EngineBroken, tokens_field: str) -> HTTPException:
    """The answer to requests the engine would not queue: 422 if they never could be, else 503."""
    if isinstance(exc, EngineBroken):
        return _busy(f"this node cannot serve: {exc}; retry on another node")
    if isinstance(exc, RequestTooLarge):
        return invalid(tokens_field, f"{exc}: shorten the prompt or ask for fewer tokens")
    if isinstance(exc, TooMuchWork):
        return invalid("prompt", f"{exc}: send fewer or shorter prompts, or ask for fewer tokens")
    return _busy()


async def run_all(
    runtime: Runtime, http_request: Request, requests: list[GenerationRequest], tokens_field: str = "max_new_tokens"
) -> list[Completion]:
    """Queue `requests` together and wait for them; a client that hangs up frees their rows."""
    try:
        submitted = runtime.engine.submit_all(requests, timeout=runtime.settings.request_timeout_s)
        return await unless_disconnected(http_request, submitted)
    except (QueueFull, RequestTooLarge, TooMuchWork, EngineBroken) as exc:
        raise _not_queued(exc, tokens_field) from None
    except EngineOverloaded as exc:
        raise _busy(str(exc)) from None
    except TimeoutError:
        raise HTTPException(504, detail="generation did not finish before the request deadline") from None
    except (RowFailed, EngineFault) as exc:
        log.error("generation failed: %s", public_message(exc), exc_info=exc)
        raise HTTPException(500, detail=public_message(exc)) from None


def start_streams(
    runtime: Runtime, requests: list[GenerationRequest], tokens_field: str = "max_new_tokens"
) -> list[RequestStream]:
    """Queue streaming requests together; a full queue is still a plain 503, before any event is sent."""
    try:
        return runtime.engine.stream_all(requests, timeout=runtime.settings.request_timeout_s)
    except (QueueFull, RequestTooLarge, TooMuchWork, EngineBroken) as exc:
        raise _not_queued(exc, tokens_field) from None
