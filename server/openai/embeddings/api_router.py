"""HTTP wiring of POST /v1/embeddings; the work is in serving.py."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends
from fastapi.responses import JSONResponse

from server.errors import ERROR_RESPONSES
from server.openai.embeddings import serving
from server.openai.embeddings.protocol import EmbeddingRequest, EmbeddingsResponse
from server.routing import ClientInputRoute
from server.services import Services, services

router = APIRouter(prefix="/v1", tags=["openai"], route_class=ClientInputRoute, responses=ERROR_RESPONSES)


@router.post(
    "/embeddings",
    response_model=EmbeddingsResponse,
    summary="OpenAI embeddings: `encoding_format` float or base64, `dimensions` truncates and renormalizes",
)
async def create_embeddings(body: EmbeddingRequest, svc: Services = Depends(services)) -> Any:
    # Returned as built (the response model documents it; validating it again costs time).
    return JSONResponse(await serving.create_embeddings(svc, body))
