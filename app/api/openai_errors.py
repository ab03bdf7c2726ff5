"""OpenAI's error shape, {"error": {"message", "type", "param", "code"}}, for every route under
/v1: validation errors, HTTPExceptions and auth refusals alike. Its own module, so that each
OpenAI-shaped router (completions, files, fine-tuning) uses it without importing another."""

from fastapi import HTTPException, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute

from app.api.errors import validation_errors


def openai_error(status: int, detail, headers: dict[str, str] | None = None) -> JSONResponse:
    """FastAPI's `detail` in OpenAI's error shape: a message, a list of validation errors, or a
    dict with the message and, optionally, the `param` and `code` it names."""
    param = code = None
    if isinstance(detail, list):  # locations start with "body", "query"...: name the top-level field
        param = next((str(error["loc"][1]) for error in detail if len(error["loc"]) > 1), None)
        detail = "; ".join(f"{'.'.join(map(str, error['loc'][1:])) or 'body'}: {error['msg']}" for error in detail)
    elif isinstance(detail, dict):
        param, code, detail = detail.get("param"), detail.get("code"), detail["message"]
    kind = "invalid_request_error" if status < 500 else "server_error"
    error = {"message": detail, "type": kind, "param": param, "code": code}
    return JSONResponse({"error": error}, status, headers=headers)


def openai_refusal(status: int, message: str, param: str | None = None, code: str | None = None,
                   headers: dict[str, str] | None = None) -> HTTPException:
    """An HTTPException that an OpenAIErrorRoute answers with this message, param and code."""
    return HTTPException(status, detail={"message": message, "param": param, "code": code}, headers=headers)


class OpenAIErrorRoute(APIRoute):
    """A route whose errors (validation, HTTPException, auth included) use OpenAI's shape."""

    def get_route_handler(self):
        handler = super().get_route_handler()

        async def handle(request: Request) -> Response:
            try:
                return await handler(request)
            except RequestValidationError as exc:
                return openai_error(422, validation_errors(exc))
            except HTTPException as exc:
                return openai_error(exc.status_code, exc.detail, exc.headers)

        return handle
