"""Files: upload, list, retrieve, delete, content. Storage is ``server.stores.files``."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Literal, cast

from fastapi import UploadFile
from pydantic import ValidationError

from ollm.errors import InvalidRequestError
from server.openai.files.protocol import ExpiresAfter, FileDeleted, FileList
from server.services import Services
from server.stores.files import DEFAULT_EXPIRY, FileRecord, Purpose

_CHUNK = 1 << 20


async def _chunks(upload: UploadFile) -> AsyncIterator[bytes]:
    while chunk := await upload.read(_CHUNK):
        yield chunk


def expiry_seconds(anchor: str | None, seconds: str | None) -> int | None:
    """An upload's ``expires_after[anchor]`` and ``expires_after[seconds]`` (multipart fields, as
    the official clients send them), checked as OpenAI checks them; None when the upload sets none."""
    if anchor is None and seconds is None:
        return None
    try:
        return ExpiresAfter.model_validate({"anchor": anchor, "seconds": seconds}).seconds
    except ValidationError as exc:
        problem = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
        raise InvalidRequestError(
            f"expires_after {problem} (anchor 'created_at', seconds from 3600 to 2592000)", param="expires_after"
        ) from None


_UPLOAD_PURPOSES: tuple[Purpose, ...] = ("batch", "user_data", "assistants")


async def upload_file(services: Services, upload: UploadFile, purpose: str, expires_after: int | None) -> FileRecord:
    if purpose not in _UPLOAD_PURPOSES:
        raise InvalidRequestError(
            f"purpose {purpose!r} is not served: upload with purpose 'batch' (Batch API input) or 'user_data' / "
            "'assistants' (files named by input_file and input_image parts)",
            param="purpose",
        )
    chosen = cast(Purpose, purpose)
    # Without expires_after, OpenAI's defaults: batch input files 30 days, other files until deleted.
    expiry = expires_after if expires_after is not None else DEFAULT_EXPIRY.get(chosen)
    return await services.files.upload(upload.filename or "upload", chosen, _chunks(upload), expiry)


async def list_files(
    services: Services, purpose: str | None, after: str | None, limit: int, order: Literal["asc", "desc"]
) -> FileList:
    data, has_more = await services.files.listing(purpose, after, limit, newest_first=order == "desc")
    return FileList(
        data=data, first_id=data[0].id if data else None, last_id=data[-1].id if data else None, has_more=has_more
    )


async def delete_file(services: Services, file_id: str) -> FileDeleted:
    await services.files.delete(file_id)
    return FileDeleted(id=file_id)
