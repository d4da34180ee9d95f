"""The Files API's wire format: the FileObject is ``server.stores.files.FileRecord``; lists and deletions."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel

from server.stores.files import FileRecord


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
