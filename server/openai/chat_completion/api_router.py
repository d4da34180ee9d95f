"""HTTP wiring of POST /v1/chat/completions; the work is in serving.py."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response
from openai.types.chat import ChatCompletion

from server.errors import ERROR_RESPONSES
from server.openai.chat_completion import serving
from server.openai.chat_completion.protocol import ChatCompletionRequest
from server.routing import ClientInputRoute
from server.services import Services, services

router = APIRouter(prefix="/v1", tags=["openai"], route_class=ClientInputRoute, responses=ERROR_RESPONSES)


@router.post(
    "/chat/completions",
    response_model=ChatCompletion,
    summary="OpenAI chat completion; `stream: true` answers with SSE chunks ending in `data: [DONE]`",
)
async def create_chat_completion(
    body: ChatCompletionRequest, http: Request, svc: Services = Depends(services)
) -> Response:
    return await serving.create_chat_completion(svc, http, body)
