"""Cap request bodies before anything parses them (413), per route prefix."""

import json

from fastapi import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send


def _message(limit: int) -> str:
    return f"request body is larger than the {limit}-byte limit"


class BodyTooLarge(HTTPException):
    """Raised by receive() past the cap. An HTTPException, because whatever reads the body (FastAPI
    parsing JSON or a form, or an upload route) lets those through as responses: any other error
    there would turn into a 400."""

    def __init__(self, limit: int):
        super().__init__(413, detail=_message(limit))


class BodySizeLimit:
    """Pure ASGI middleware: refuses a declared Content-Length over the cap at once, and stops
    a chunked body as soon as it passes the cap."""

    def __init__(self, app: ASGIApp, limits: dict[tuple[str, str], int], default: int):
        self.app = app
        self.limits = limits  # (method, path prefix) -> bytes
        self.default = default

    def _limit_for(self, method: str, path: str) -> int:
        for (m, prefix), limit in self.limits.items():
            if m == method and path.startswith(prefix):
                return limit
        return self.default

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        limit = self._limit_for(scope["method"], scope["path"])
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            return await _reject(send, limit)

        received = 0

        async def counted_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise BodyTooLarge(limit)
            return message

        await self.app(scope, counted_receive, send)


async def _reject(send: Send, limit: int) -> None:
    body = json.dumps({"detail": _message(limit)}).encode()
    await send(
        {
            "type": "http.response.start",
            "status": 413,
            "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())],
        }
    )
    await send({"type": "http.response.body", "body": body})
