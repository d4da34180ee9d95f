"""HTTP wiring of /v1/files; the work is in serving.py."""

from __future__ import annotations

from typing import Literal

from fastapi import APIRouter, Depends, File, Form, Query, UploadFile
from fastapi.responses import FileResponse

from server.errors import ERROR_RESPONSES
from server.openai.files import serving
from server.openai.files.protocol import FileDeleted, FileList
from server.routing import ClientInputRoute
from server.services import Services, services
from server.stores.files import FileRecord

router = APIRouter(prefix="/v1", tags=["openai"], route_class=ClientInputRoute, responses=ERROR_RESPONSES)


@router.post(
    "/files",
    response_model=FileRecord,
    summary="Upload a file (multipart: `file`, `purpose` = batch for the Batch API, user_data or assistants for "
    "input_file / input_image parts)",
)
async def upload_file(
    file: UploadFile = File(...),
    purpose: str = Form(...),
    anchor: str | None = Form(None, alias="expires_after[anchor]", description="`created_at`"),
    seconds: str | None = Form(
        None, alias="expires_after[seconds]", description="3600 to 2592000; a `batch` file is kept 30 days by default"
    ),
    svc: Services = Depends(services),
) -> FileRecord:
    return await serving.upload_file(svc, file, purpose, serving.expiry_seconds(anchor, seconds))


@router.get("/files", response_model=FileList, summary="Files, newest first unless `order=asc`")
async def list_files(
    purpose: str | None = None,
    after: str | None = None,
    limit: int = Query(10000, ge=1, le=10000),
    order: Literal["asc", "desc"] = "desc",
    svc: Services = Depends(services),
) -> FileList:
    return await serving.list_files(svc, purpose, after, limit, order)


@router.get("/files/{file_id}", response_model=FileRecord, summary="A file's record")
async def retrieve_file(file_id: str, svc: Services = Depends(services)) -> FileRecord:
    return await svc.files.get(file_id)


@router.delete("/files/{file_id}", response_model=FileDeleted, summary="Delete a file and its content")
async def delete_file(file_id: str, svc: Services = Depends(services)) -> FileDeleted:
    return await serving.delete_file(svc, file_id)


@router.get("/files/{file_id}/content", summary="A file's content (a batch's output or error lines: JSONL)")
async def file_content(file_id: str, svc: Services = Depends(services)) -> FileResponse:
    # Streamed from disk a chunk at a time: a file may be as large as server.max_file_bytes.
    return FileResponse(await svc.files.content(file_id), media_type="application/jsonl")
