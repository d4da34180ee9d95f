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


@router.api_route("/messages", methods=["GET", "PUT", "PATCH", "DELETE"], include_in_schema=False)
async def wrong_method(http: Request) -> Response:
    # Declared so that this mistake, too, is answered in Anthropic's shape (through AnthropicRoute)
    # rather than by the app-level handler in OpenAI's.
    raise HTTPException(405, f"{http.method} /v1/messages is not supported; send POST", headers={"Allow": "POST"})
