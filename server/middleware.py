"""ASGI middleware: request body size limit (413) and the API key (401)."""

from __future__ import annotations

import hmac
import json

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from server.anthropic.errors import error_body as anthropic_error_body
from server.anthropic.errors import is_anthropic_path
from server.errors import error_body

# Health stays open so load balancers and `ollm` itself can probe without the key.
_OPEN_PATHS = frozenset({"/v1/health"})


async def _send_error(
    scope: Scope, send: Send, status: int, message: str, code: str, headers: list[tuple[bytes, bytes]]
) -> None:
    # Each API family answers in its own error shape: Ollama's clients read {"error": "..."},
    # Anthropic's {"type": "error", "error": {...}}.
    path = scope["path"]
    if path == "/api" or path.startswith("/api/"):
        payload = {"error": message}
    elif is_anthropic_path(path):
        payload = anthropic_error_body(status, message)
    else:
        payload = error_body(status, message, code=code)
    body = json.dumps(payload).encode()
    await send({
        "type": "http.response.start",
        "status": status,
        "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()), *headers],
    })  # fmt: skip
    await send({"type": "http.response.body", "body": body})


class _TooLarge(BaseException):  # noqa: N818  (BaseException: body parsers catch Exception)
    """Raised from receive(); derives from BaseException so no body parser swallows it."""


class BodyLimit:
    """``max_bytes`` for every body, except the paths in ``larger`` (path -> limit, setting name):
    uploads to /v1/files are bounded by server.max_file_bytes instead."""

    def __init__(self, app: ASGIApp, max_bytes: int, larger: dict[str, tuple[int, str]] | None = None) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.larger = larger or {}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        max_bytes, setting = self.larger.get(scope["path"], (self.max_bytes, "server.max_request_bytes"))
        message = f"the request body is larger than {max_bytes} bytes ({setting})"
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > max_bytes:
            await _send_error(scope, send, 413, message, "request_too_large", [])
            return
        seen = 0
        started = False

        async def counted_receive() -> Message:
            nonlocal seen
            received = await receive()
            if received["type"] == "http.request":
                seen += len(received.get("body", b""))
                if seen > max_bytes:
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


class ApiKeyAuth:
    """``Authorization: Bearer <key>`` (OpenAI, Ollama clients) or ``x-api-key: <key>`` (Anthropic's)."""

    def __init__(self, app: ASGIApp, api_key: str) -> None:
        self.app = app
        self.bearer = f"Bearer {api_key}".encode()
        self.key = api_key.encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in _OPEN_PATHS:
            await self.app(scope, receive, send)
            return
        headers = dict(scope["headers"])
        bearer = hmac.compare_digest(headers.get(b"authorization", b""), self.bearer)
        if not (bearer or hmac.compare_digest(headers.get(b"x-api-key", b""), self.key)):
            message = "missing or invalid API key: send `Authorization: Bearer <server.api_key>` or `x-api-key`"
            await _send_error(scope, send, 401, message, "invalid_api_key", [(b"www-authenticate", b"Bearer")])
            return
        await self.app(scope, receive, send)
