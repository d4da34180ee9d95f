"""Ollama-shaped errors for the /api routes: ``{"error": "..."}`` with Ollama's status codes.

The app's exception handlers answer in OpenAI's shape for /v1. Rather than branch on the path in
those shared handlers, the /api router uses ``OllamaRoute``, whose handler turns every failure of
its own routes into Ollama's shape before the app-level handlers see it; /v1 is untouched.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Coroutine
from typing import Any

import redis
from fastapi import Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException

from ollm.errors import ModelNotFoundError, OllmError
from server.errors import redis_unavailable_message
from server.routing import ClientInputRoute

log = logging.getLogger(__name__)


class OllamaModelNotFound(ModelNotFoundError):
    """Ollama's exact wording: clients (and people) recognise it and know to pull."""

    def __init__(self, name: str) -> None:
        super().__init__(f'model "{name}" not found, try pulling it first', param="model")


class OllamaErrorResponse(BaseModel):
    """The body of every /api error (Ollama's shape)."""

    error: str


# Declared on the /api router (instead of FastAPI's 422 schema, which Ollama never sends: its
# validation errors are 400s).
ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    "4XX": {"model": OllamaErrorResponse, "description": "Bad request, unknown model (404), missing API key"},
    "5XX": {"model": OllamaErrorResponse, "description": "No live worker, Redis unavailable, timeout"},
}


def error_response(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


def validation_message(exc: RequestValidationError) -> str:
    errors = exc.errors()
    if not errors:
        return "invalid request"
    first = errors[0]
    if first.get("type") == "json_invalid":
        return f"invalid JSON in the request body: {first.get('ctx', {}).get('error', first.get('msg'))}"
    location = ".".join(str(part) for part in first.get("loc", ()) if part != "body")
    if first.get("type") == "missing":
        return f"{location} is required" if location else "a required field is missing"
    return f"{location}: {first.get('msg', 'invalid value')}" if location else str(first.get("msg"))


def ollama_error(request: Request, exc: Exception) -> JSONResponse:
    if isinstance(exc, RequestValidationError):
        return error_response(400, validation_message(exc))
    if isinstance(exc, OllmError):
        if exc.status >= 500:
            log.warning("%s %s -> %s: %s", request.method, request.url.path, exc.status, exc.message)
        return error_response(exc.status, exc.message)
    if isinstance(exc, StarletteHTTPException):
        return error_response(exc.status_code, exc.detail if isinstance(exc.detail, str) else str(exc.detail))
    if isinstance(exc, redis.RedisError):
        return error_response(503, redis_unavailable_message(exc))
    log.exception("unhandled error on %s %s", request.method, request.url.path)
    return error_response(500, f"internal error: {type(exc).__name__}: {exc}")


class OllamaRoute(ClientInputRoute):
    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def ollama_handler(request: Request) -> Response:
            _body_is_json(request)
            try:
                return await handler(request)
            except Exception as exc:
                return ollama_error(request, exc)

        return ollama_handler


def _body_is_json(request: Request) -> None:
    """Ollama reads every body as JSON whatever its content type, and its documented examples are
    ``curl -d '{...}'`` (which sends form encoding): declare the body JSON so FastAPI parses it so."""
    headers = [(k, v) for k, v in request.scope["headers"] if k.lower() != b"content-type"]
    request.scope["headers"] = [*headers, (b"content-type", b"application/json")]
    if hasattr(request, "_headers"):
        del request._headers


def message_of(exc: BaseException) -> str:
    """The text of the ``{"error"}`` line a stream ends with when ``exc`` happens mid-stream."""
    if isinstance(exc, OllmError):
        return exc.message
    return f"internal error: {type(exc).__name__}: {exc}"
