"""HTTP wiring of the Responses routes; the work is in serving.py."""

from __future__ import annotations

from typing import Any, Literal

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import Response
from openai.types.responses import Response as OpenAIResponse

from server.errors import ERROR_RESPONSES
from server.openai.responses import serving
from server.openai.responses.protocol import ResponseRequest
from server.routing import ClientInputRoute
from server.services import Services, services

router = APIRouter(prefix="/v1", tags=["openai"], route_class=ClientInputRoute, responses=ERROR_RESPONSES)


@router.post(
    "/responses",
    response_model=OpenAIResponse,
    summary="OpenAI Responses; `stream: true` answers with typed SSE events (response.created ... completed)",
)
async def create_response(body: ResponseRequest, http: Request, svc: Services = Depends(services)) -> Response:
    return await serving.create_response(svc, http, body)


@router.get("/responses/{response_id}", response_model=OpenAIResponse, summary="A stored response")
async def retrieve_response(response_id: str, svc: Services = Depends(services)) -> Any:
    return await serving.retrieve_response(svc, response_id)


@router.delete("/responses/{response_id}", summary="Delete a stored response; later reads answer 404")
async def delete_response(response_id: str, svc: Services = Depends(services)) -> dict[str, Any]:
    return await serving.delete_response(svc, response_id)


@router.get("/responses/{response_id}/input_items", summary="The input items of a stored response")
async def list_input_items(
    response_id: str,
    limit: int = Query(20, ge=1, le=100),
    order: Literal["asc", "desc"] = "desc",
    after: str | None = None,
    svc: Services = Depends(services),
) -> dict[str, Any]:
    return await serving.list_input_items(svc, response_id, limit, order, after)
