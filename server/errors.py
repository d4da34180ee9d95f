"""OpenAI-style error bodies for every /v1 route, and the exception handlers that produce them.

Every failure a client can see has the shape ``{"error": {"message", "type", "param", "code"}}``
with the matching HTTP status: OllmError subclasses carry their own, FastAPI validation errors
become 422, Redis outages 503, and anything unexpected a 500 that says so (never a bare one).
"""

from __future__ import annotations

import logging
from typing import Any

import redis
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException

from ollm.errors import OllmError
from ollm.generation import ErrorEvent
from ollm.redis_tls import tls_problem

log = logging.getLogger(__name__)

_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
          404: "invalid_request_error", 405: "invalid_request_error", 413: "invalid_request_error",
          422: "invalid_request_error", 429: "rate_limit_error"}  # fmt: skip


class ApiError(OllmError):
    """An error with its status and code chosen at the raise site (e.g. relayed from a worker)."""

    def __init__(self, status: int, message: str, *, code: str | None = None, param: str | None = None) -> None:
        super().__init__(message, param=param)
        self.status = status
        self.code = code or _default_code(status)
        self.kind = error_type(status)


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None
    code: str | None


class ErrorResponse(BaseModel):
    """The body of every /v1 error (OpenAI's shape)."""

    error: ErrorDetail


# Declared on every /v1 router, so /openapi.json says what a failure looks like (FastAPI's own
# 422 schema, ``{"detail": [...]}``, is not what ollm sends). 4XX: bad JSON, a body that does not
# match the schema (422), an unknown model, response or session (404), a missing API key (401),
# a body over server.max_request_bytes (413). 5XX: no live worker or Redis down (503), timeout (504).
ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    "4XX": {"model": ErrorResponse, "description": "The request cannot be served as sent; the message says why"},
    "5XX": {"model": ErrorResponse, "description": "The service cannot serve it now (no worker, Redis, timeout)"},
}


def error_type(status: int) -> str:
    return _TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")


def _default_code(status: int) -> str:
    return {401: "invalid_api_key", 404: "not_found", 413: "request_too_large", 422: "invalid_request",
            503: "service_unavailable", 504: "timeout"}.get(status, "error")  # fmt: skip


def error_body(status: int, message: str, *, code: str | None = None, param: str | None = None) -> dict[str, Any]:
    return {
        "error": {
            "message": message,
            "type": error_type(status),
            "param": param,
            "code": code or _default_code(status),
        }
    }


def body_for(exc: OllmError) -> dict[str, Any]:
    return {"error": {"message": exc.message, "type": exc.kind, "param": exc.param, "code": exc.code}}


def error_response(status: int, message: str, *, code: str | None = None, param: str | None = None,
                   headers: dict[str, str] | None = None) -> JSONResponse:  # fmt: skip
    return JSONResponse(error_body(status, message, code=code, param=param), status_code=status, headers=headers)


def error_from_event(event: ErrorEvent) -> ApiError:
    return ApiError(event.status, event.message, code=event.code)


def event_from_error(exc: BaseException) -> ErrorEvent:
    """The error event a stream ends with when ``exc`` happens after the response has started."""
    if isinstance(exc, OllmError):
        return ErrorEvent.from_error(exc)
    if isinstance(exc, redis.RedisError):
        return ErrorEvent(message=redis_unavailable_message(exc), status=503, code="redis_unavailable")
    return ErrorEvent(message=f"internal error: {type(exc).__name__}: {exc}", status=500, code="internal_error")


def redis_unavailable_message(exc: BaseException) -> str:
    problem = tls_problem(exc)
    if problem is not None:
        # Waiting does not fix a misconfiguration: say what to change instead.
        return f"Redis is unavailable ({exc}); {problem}"
    return f"Redis is unavailable ({exc}); requests cannot be queued until it is back"


def validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    errors = exc.errors()
    if not errors:
        return "invalid request", None
    first = errors[0]
    # Drop the "body" prefix: the client thinks in terms of its JSON fields.
    location = [str(part) for part in first.get("loc", ()) if part != "body"]
    param = ".".join(location) or None
    message = first.get("msg", "invalid value")
    if first.get("type") == "json_invalid":
        return f"the request body is not valid JSON: {first.get('ctx', {}).get('error', message)}", "body"
    more = f" (and {len(errors) - 1} more problems)" if len(errors) > 1 else ""
    return (f"{param}: {message}{more}" if param else f"{message}{more}"), param


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(OllmError)
    async def _ollm(request: Request, exc: OllmError) -> JSONResponse:
        if exc.status >= 500:
            log.warning("%s %s -> %s: %s", request.method, request.url.path, exc.status, exc.message)
        return JSONResponse(body_for(exc), status_code=exc.status)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        message, param = validation_message(exc)
        if param == "body":
            # Not JSON at all is bad input (400); JSON of the wrong shape is a validation error (422).
            return error_response(400, message, code="invalid_json")
        return error_response(422, message, code="invalid_request", param=param)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        message = exc.detail if isinstance(exc.detail, str) else str(exc.detail)
        if exc.status_code == 404 and message == "Not Found":
            message = f"no route {request.method} {request.url.path}"
        return error_response(exc.status_code, message, headers=getattr(exc, "headers", None))

    @app.exception_handler(redis.RedisError)
    async def _redis(request: Request, exc: redis.RedisError) -> JSONResponse:
        return error_response(503, redis_unavailable_message(exc), code="redis_unavailable")

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return error_response(500, f"internal error: {type(exc).__name__}: {exc}", code="internal_error")
