"""HTTP wiring of POST /v1/completions; the work is in serving.py."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response
from openai.types import Completion

from server.errors import ERROR_RESPONSES
from server.openai.completion import serving
from server.openai.completion.protocol import CompletionRequest
from server.routing import ClientInputRoute
from server.services import Services, services

router = APIRouter(prefix="/v1", tags=["openai"], route_class=ClientInputRoute, responses=ERROR_RESPONSES)


@router.post(
    "/completions",
    response_model=Completion,
    summary="OpenAI text completion of a raw prompt; `stream: true` answers with SSE chunks ending in `[DONE]`",
)
async def create_completion(body: CompletionRequest, http: Request, svc: Services = Depends(services)) -> Response:
    return await serving.create_completion(svc, http, body)
