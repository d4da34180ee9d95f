"""Files: upload, list, retrieve, delete, content. Storage is ``server.stores.files``."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Literal

from fastapi import UploadFile

from ollm.errors import InvalidRequestError
from server.openai.files.protocol import FileDeleted, FileList
from server.openai.pagination import page
from server.services import Services
from server.stores.files import FileRecord

_CHUNK = 1 << 20


async def _chunks(upload: UploadFile) -> AsyncIterator[bytes]:
    while chunk := await upload.read(_CHUNK):
        yield chunk


async def upload_file(services: Services, upload: UploadFile, purpose: str) -> FileRecord:
    if purpose != "batch":
        raise InvalidRequestError(
            f"purpose {purpose!r} is not served: ollm keeps files for the Batch API; upload with purpose 'batch'",
            param="purpose",
        )
    return await services.files.upload(upload.filename or "upload.jsonl", "batch", _chunks(upload))


async def list_files(
    services: Services, purpose: str | None, after: str | None, limit: int, order: Literal["asc", "desc"]
) -> FileList:
    records = await services.files.listing(purpose)
    if order == "desc":
        records.reverse()
    data, has_more = page(records, lambda r: r.id, after, limit)
    return FileList(
        data=data, first_id=data[0].id if data else None, last_id=data[-1].id if data else None, has_more=has_more
    )


async def delete_file(services: Services, file_id: str) -> FileDeleted:
    await services.files.delete(file_id)
    return FileDeleted(id=file_id)
