"""HTTP wiring of GET /v1/models and GET /v1/models/{model_id}; the work is in serving.py."""

from __future__ import annotations

from typing import Any, Literal

from fastapi import APIRouter, Depends
from openai.types import Model
from pydantic import BaseModel

from server.errors import ERROR_RESPONSES
from server.openai.models import serving
from server.routing import ClientInputRoute
from server.services import Services, services

router = APIRouter(prefix="/v1", tags=["openai"], route_class=ClientInputRoute, responses=ERROR_RESPONSES)


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[Model]


@router.get("/models", response_model=ModelList, summary="Models served by live workers")
async def list_models(svc: Services = Depends(services)) -> dict[str, Any]:
    return {"object": "list", "data": await serving.list_models(svc)}


@router.get("/models/{model_id:path}", response_model=Model, summary="One model served by a live worker")
async def retrieve_model(model_id: str, svc: Services = Depends(services)) -> Model:
    return await serving.retrieve_model(svc, model_id)
