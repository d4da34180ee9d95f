"""Files: upload, list, retrieve, delete, content. Storage is ``server.stores.files``."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Literal, cast

from fastapi import UploadFile

from ollm.errors import InvalidRequestError
from server.openai.files.protocol import FileDeleted, FileList
from server.openai.pagination import page
from server.services import Services
from server.stores.files import FileRecord, Purpose

_CHUNK = 1 << 20


async def _chunks(upload: UploadFile) -> AsyncIterator[bytes]:
    while chunk := await upload.read(_CHUNK):
        yield chunk


_UPLOAD_PURPOSES: tuple[Purpose, ...] = ("batch", "user_data", "assistants")


async def upload_file(services: Services, upload: UploadFile, purpose: str) -> FileRecord:
    if purpose not in _UPLOAD_PURPOSES:
        raise InvalidRequestError(
            f"purpose {purpose!r} is not served: upload with purpose 'batch' (Batch API input) or 'user_data' / "
            "'assistants' (files named by input_file and input_image parts)",
            param="purpose",
        )
    return await services.files.upload(upload.filename or "upload", cast(Purpose, purpose), _chunks(upload))


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
