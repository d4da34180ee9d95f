"""Anthropic-shaped errors for /v1/messages: ``{"type": "error", "error": {"type", "message"}}``.

The app's exception handlers answer in OpenAI's shape for the other /v1 routes. Like the Ollama
family, the Messages router uses its own route class (``AnthropicRoute``) that turns every failure
of its routes into Anthropic's shape and status codes before the app-level handlers see it;
the auth and body-size middleware use ``error_body`` for these paths too.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Coroutine
from typing import Any

import redis
from fastapi import Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from ollm.errors import OllmError
from server.anthropic.protocol import ErrorDetail, ErrorResponse, ErrorType
from server.errors import redis_unavailable_message, validation_message
from server.routing import ClientInputRoute

log = logging.getLogger(__name__)

PATH = "/v1/messages"

_TYPES: dict[int, ErrorType] = {
    400: "invalid_request_error", 401: "authentication_error", 403: "permission_error", 404: "not_found_error",
    413: "request_too_large", 429: "rate_limit_error", 503: "overloaded_error", 504: "timeout_error",
}  # fmt: skip


# Declared on the router (instead of FastAPI's 422 schema: Anthropic answers malformed requests
# with 400), so /openapi.json says what a failure looks like.
ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    "4XX": {"model": ErrorResponse, "description": "Invalid request, unknown model (404), missing API key"},
    "5XX": {"model": ErrorResponse, "description": "No live worker (overloaded), Redis unavailable, timeout"},
}


def is_anthropic_path(path: str) -> bool:
    return path == PATH or path.startswith(PATH + "/")


def error_type(status: int) -> ErrorType:
    return _TYPES.get(status, "api_error" if status >= 500 else "invalid_request_error")


def error_body(status: int, message: str) -> dict[str, Any]:
    return ErrorResponse(error=ErrorDetail(type=error_type(status), message=message)).model_dump(mode="json")


def error_response(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(error_body(status, message), status_code=status, headers=headers)


def anthropic_error(request: Request, exc: Exception) -> JSONResponse:
    if isinstance(exc, RequestValidationError):
        # Anthropic answers every malformed request with 400 invalid_request_error (never 422).
        message, _ = validation_message(exc)
        return error_response(400, message)
    if isinstance(exc, OllmError):
        if exc.status >= 500:
            log.warning("%s %s -> %s: %s", request.method, request.url.path, exc.status, exc.message)
        return error_response(exc.status, exc.message)
    if isinstance(exc, StarletteHTTPException):
        detail = exc.detail if isinstance(exc.detail, str) else str(exc.detail)
        return error_response(exc.status_code, detail, getattr(exc, "headers", None))
    if isinstance(exc, redis.RedisError):
        return error_response(503, redis_unavailable_message(exc))
    log.exception("unhandled error on %s %s", request.method, request.url.path)
    return error_response(500, f"internal error: {type(exc).__name__}: {exc}")


class AnthropicRoute(ClientInputRoute):
    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def anthropic_handler(request: Request) -> Response:
            try:
                return await handler(request)
            except Exception as exc:
                return anthropic_error(request, exc)

        return anthropic_handler
