"""HTTP wiring of POST /v1/messages and /v1/messages/count_tokens; the work is in serving.py."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response
from starlette.exceptions import HTTPException

from server.anthropic import serving
from server.anthropic.errors import ERROR_RESPONSES, AnthropicRoute
from server.anthropic.protocol import CountTokensRequest, MessageResponse, MessagesRequest, MessageTokensCount
from server.services import Services, services

router = APIRouter(prefix="/v1", tags=["anthropic"], route_class=AnthropicRoute, responses=ERROR_RESPONSES)


@router.post(
    "/messages",
    response_model=MessageResponse,
    summary="Anthropic Messages; `stream: true` answers with Anthropic's typed SSE events",
)
async def create_message(body: MessagesRequest, http: Request, svc: Services = Depends(services)) -> Response:
    return await serving.create_message(svc, http, body)


@router.post(
    "/messages/count_tokens",
    response_model=MessageTokensCount,
    summary="Input tokens of a Messages request, counted by a worker with the model's own tokenizer",
)
async def count_tokens(
    body: CountTokensRequest, http: Request, svc: Services = Depends(services)
) -> MessageTokensCount:
    return await serving.count_tokens(svc, http, body)


# What the two routes below answer instead of the app-level handlers, whose errors are OpenAI's:
# Anthropic clients (the SDK, Claude Code) read only Anthropic's shape.
_ANY_METHOD = ["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"]
_ROUTES = {"/v1/messages", "/v1/messages/count_tokens"}


@router.api_route("/messages", methods=[m for m in _ANY_METHOD if m != "POST"], include_in_schema=False)
async def wrong_method(http: Request) -> Response:
    raise HTTPException(405, f"{http.method} /v1/messages is not supported; send POST", headers={"Allow": "POST"})


@router.api_route("/messages/{path:path}", methods=_ANY_METHOD, include_in_schema=False)
async def unknown(path: str, http: Request) -> Response:
    # Registered last: only what no route above takes lands here, including a known path with
    # the wrong method (Starlette would otherwise answer that 405 through the app's handler).
    target = f"/v1/messages/{path}"
    if target in _ROUTES:
        raise HTTPException(405, f"{http.method} {target} is not supported; send POST", headers={"Allow": "POST"})
    served = " and ".join(f"POST {route}" for route in sorted(_ROUTES))
    raise HTTPException(404, f"no route {http.method} {target}: ollm serves {served}")
