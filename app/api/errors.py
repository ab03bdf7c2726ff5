"""Errors as clients see them: validation errors as strict JSON, whatever input they echo, and
server errors as a short message with the request's id, never an exception's own text.

FastAPI's 422 repeats each offending input, and Python's json reads what JSON cannot carry back:
the NaN and Infinity literals, and lone surrogate escapes ("\\ud800") that UTF-8 cannot encode;
a body that is not JSON is echoed as bytes, which need not be UTF-8. Echoed as they are, the error
response itself would fail with a 500.
"""

import math

from fastapi import Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match

from app.engine.core import EngineFault, EngineOverloaded, RowFailed
from app.engine.engine import EngineBroken
from app.observability import current_request_id
from app.schemas import SURROGATE

# Failures whose message was written for the client; any other exception's text stays in the log.
_TOLD_AS_IS = (RowFailed, EngineFault, EngineOverloaded, EngineBroken, TimeoutError)


async def method_not_allowed(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    """405 with `Allow` naming every method of the path: Starlette names only those of the first
    route that matched it, and a path's methods may sit on several routes."""
    methods = [method for method in ("DELETE", "GET", "PATCH", "POST", "PUT")
               if any(route.matches(request.scope | {"method": method})[0] == Match.FULL for route in request.app.routes)]
    return JSONResponse({"detail": exc.detail}, 405, headers={"Allow": ", ".join(methods)})


def public_message(exc: BaseException) -> str:
    """What a client is told of a failure: our own short message, or "internal server error",
    with the request id that finds the whole story in the server's log."""
    text = str(exc) if isinstance(exc, _TOLD_AS_IS) else "internal server error"
    return f"{text} (request id {current_request_id()})"


def _json_safe(value):
    """`value` (jsonable) with non-finite floats as strings and lone surrogates as U+FFFD."""
    if isinstance(value, float) and not math.isfinite(value):
        return "NaN" if math.isnan(value) else ("Infinity" if value > 0 else "-Infinity")
    if isinstance(value, str):
        return SURROGATE.sub("\ufffd", value)
    if isinstance(value, dict):
        return {_json_safe(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_json_safe(v) for v in value]
    return value


def validation_errors(exc: RequestValidationError) -> list[dict]:
    """FastAPI's list of errors, safe to send as JSON."""
    return _json_safe(jsonable_encoder(exc.errors(), custom_encoder={bytes: lambda b: b.decode("utf-8", "replace")}))


async def request_validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    """FastAPI's default 422 answer, made safe to encode."""
    return JSONResponse({"detail": validation_errors(exc)}, 422)
