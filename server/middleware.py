"""ASGI middleware: request body size limit (413) and the bearer API key (401)."""

from __future__ import annotations

import hmac
import json

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from server.errors import error_body

# Health stays open so load balancers and `ollm` itself can probe without the key.
_OPEN_PATHS = frozenset({"/v1/health"})


async def _send_error(
    scope: Scope, send: Send, status: int, message: str, code: str, headers: list[tuple[bytes, bytes]]
) -> None:
    # Each API family answers in its own error shape: Ollama's clients read {"error": "..."}.
    ollama = scope["path"] == "/api" or scope["path"].startswith("/api/")
    body = json.dumps({"error": message} if ollama else error_body(status, message, code=code)).encode()
    await send({
        "type": "http.response.start",
        "status": status,
        "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()), *headers],
    })  # fmt: skip
    await send({"type": "http.response.body", "body": body})


class _TooLarge(BaseException):  # noqa: N818  (BaseException: body parsers catch Exception)
    """Raised from receive(); derives from BaseException so no body parser swallows it."""


class BodyLimit:
    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        message = (
            f"the request body is larger than {self.max_bytes} bytes (server.max_request_bytes)"
        )
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_bytes:
            await _send_error(scope, send, 413, message, "request_too_large", [])
            return
        seen = 0
        started = False

        async def counted_receive() -> Message:
            nonlocal seen
            received = await receive()
            if received["type"] == "http.request":
                seen += len(received.get("body", b""))
                if seen > self.max_bytes:
                    raise _TooLarge()
            return received

        async def tracked_send(sent: Message) -> None:
            nonlocal started
            started = started or sent["type"] == "http.response.start"
            await send(sent)

        try:
            await self.app(scope, counted_receive, tracked_send)
        except _TooLarge:
            # A chunked body without Content-Length: only now do we know it is too big.
            if not started:
                await _send_error(scope, send, 413, message, "request_too_large", [])


class BearerAuth:
    def __init__(self, app: ASGIApp, api_key: str) -> None:
        self.app = app
        self.expected = f"Bearer {api_key}".encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in _OPEN_PATHS:
            await self.app(scope, receive, send)
            return
        given = dict(scope["headers"]).get(b"authorization", b"")
        if not hmac.compare_digest(given, self.expected):
            message = "missing or invalid API key: send `Authorization: Bearer <server.api_key>`"
            await _send_error(scope, send, 401, message, "invalid_api_key", [(b"www-authenticate", b"Bearer")])
            return
        await self.app(scope, receive, send)
