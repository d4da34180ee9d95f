"""HTTP wiring of /v1/batches; the work is in serving.py (routes) and runner.py (running them)."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Query, Request

from server.errors import ERROR_RESPONSES
from server.openai.batches import serving
from server.openai.batches.protocol import BatchCreateRequest, BatchList
from server.routing import ClientInputRoute
from server.services import Services, services
from server.stores.batches import BatchRecord

router = APIRouter(prefix="/v1", tags=["openai"], route_class=ClientInputRoute, responses=ERROR_RESPONSES)


@router.post(
    "/batches",
    response_model=BatchRecord,
    summary="OpenAI Batch API: run every request of an uploaded JSONL file at low priority",
)
async def create_batch(body: BatchCreateRequest, http: Request, svc: Services = Depends(services)) -> BatchRecord:
    record = await serving.create_batch(svc, body)
    runner = getattr(http.app.state, "batch_runner", None)
    if runner is not None:  # else (no lifespan: a test's app) the next scan finds it
        runner.wake()
    return record


@router.get("/batches", response_model=BatchList, summary="Batches, newest first")
async def list_batches(
    after: str | None = None, limit: int = Query(20, ge=1, le=100), svc: Services = Depends(services)
) -> BatchList:
    return await serving.list_batches(svc, after, limit)


@router.get("/batches/{batch_id}", response_model=BatchRecord, summary="A batch: status, request counts, files")
async def retrieve_batch(batch_id: str, svc: Services = Depends(services)) -> BatchRecord:
    return await serving.retrieve_batch(svc, batch_id)


@router.post(
    "/batches/{batch_id}/cancel",
    response_model=BatchRecord,
    summary="Cancel a batch: no more of its lines start; it ends `cancelled` with the results so far",
)
async def cancel_batch(batch_id: str, svc: Services = Depends(services)) -> BatchRecord:
    return await serving.cancel_batch(svc, batch_id)
