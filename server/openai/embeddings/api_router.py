"""HTTP wiring of POST /v1/embeddings; the work is in serving.py."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends
from fastapi.responses import JSONResponse
from openai.types import CreateEmbeddingResponse

from server.openai.embeddings import serving
from server.openai.embeddings.protocol import EmbeddingRequest
from server.services import Services, services

router = APIRouter(prefix="/v1", tags=["openai"])


@router.post(
    "/embeddings",
    response_model=CreateEmbeddingResponse,
    summary="OpenAI embeddings: `encoding_format` float or base64, `dimensions` truncates and renormalizes",
)
async def create_embeddings(body: EmbeddingRequest, svc: Services = Depends(services)) -> Any:
    # Returned as-is (not through response_model, which documents the float form): base64 data
    # is a string where that model says list[float].
    return JSONResponse(await serving.create_embeddings(svc, body))
