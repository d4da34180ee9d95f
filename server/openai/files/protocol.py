"""The Files API's wire format: the FileObject is ``server.stores.files.FileRecord``; lists and deletions."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field

from server.stores.files import MAX_EXPIRY_SECONDS, MIN_EXPIRY_SECONDS, FileRecord


class ExpiresAfter(BaseModel):
    """OpenAI's expiration policy of a file (an upload's ``expires_after``, a batch's
    ``output_expires_after``): ``seconds`` after the file's creation."""

    anchor: Literal["created_at"] = Field(description="Only `created_at`, as OpenAI.")
    seconds: int = Field(ge=MIN_EXPIRY_SECONDS, le=MAX_EXPIRY_SECONDS, description="From 1 hour to 30 days.")


class FileList(BaseModel):
    object: Literal["list"] = "list"
    data: list[FileRecord]
    first_id: str | None = None
    last_id: str | None = None
    has_more: bool = False


class FileDeleted(BaseModel):
    id: str
    object: Literal["file"] = "file"
    deleted: bool = True
