"""Files of /v1/files: the content on disk under ``server.files_dir``, the record in Redis.

A file is ``<files_dir>/<id>.jsonl`` with its record (OpenAI's FileObject as JSON) at
``<ns>:file:<id>`` and its id in the sorted set ``<ns>:files``, so uploads and batch outputs
survive restarts and every server replica sharing the directory sees them. Ids are issued here
(``file-`` and 32 hex digits) and a client's id must have exactly that form before it names a
path, so no id reaches outside the directory.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import re
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Literal

import redis.asyncio
from pydantic import BaseModel

from ollm.contract import Keys
from ollm.errors import OllmError

_FILE_ID = re.compile(r"file-[0-9a-f]{32}")

# user_data / assistants: files a request names as input (server/documents.py reads them).
Purpose = Literal["batch", "batch_output", "user_data", "assistants"]


class NoSuchFileError(OllmError):
    status = 404
    code = "file_not_found"
    kind = "invalid_request_error"


class FileTooLargeError(OllmError):
    status = 413
    code = "file_too_large"
    kind = "invalid_request_error"


class FileRecord(BaseModel):
    """OpenAI's FileObject, as stored and as returned."""

    id: str
    object: Literal["file"] = "file"
    bytes: int
    created_at: int
    filename: str
    purpose: Purpose
    status: Literal["uploaded", "processed", "error"] = "processed"
    expires_at: int | None = None
    status_details: str | None = None


def new_file_id() -> str:
    return f"file-{uuid.uuid4().hex}"


def derived_file_id(seed: str) -> str:
    """The same id for the same seed: a batch's output file keeps its id when finalizing is redone."""
    return f"file-{hashlib.sha256(seed.encode()).hexdigest()[:32]}"


def is_file_id(value: str) -> bool:
    return bool(_FILE_ID.fullmatch(value))


class FileStore:
    def __init__(self, connection: redis.asyncio.Redis, keys: Keys, directory: Path, max_bytes: int) -> None:
        self.connection = connection
        self.keys = keys
        self.directory = directory
        self.max_bytes = max_bytes

    def path(self, file_id: str) -> Path:
        if not is_file_id(file_id):
            raise NoSuchFileError(f"no file with id {file_id[:64]!r}", param="file_id")
        return self.directory / f"{file_id}.jsonl"

    async def upload(self, filename: str, purpose: Purpose, chunks: AsyncIterator[bytes]) -> FileRecord:
        """Store an upload chunk by chunk; over ``max_bytes`` nothing is kept and it is a 413."""
        file_id = new_file_id()
        path = self.path(file_id)
        partial = path.with_suffix(".part")
        await asyncio.to_thread(self.directory.mkdir, parents=True, exist_ok=True)
        size = 0
        try:
            with partial.open("wb") as out:
                async for chunk in chunks:
                    size += len(chunk)
                    if size > self.max_bytes:
                        raise FileTooLargeError(
                            f"the file is larger than {self.max_bytes} bytes (server.max_file_bytes); "
                            "split it into several files and batches",
                            param="file",
                        )
                    await asyncio.to_thread(out.write, chunk)
            await asyncio.to_thread(os.replace, partial, path)
        finally:
            partial.unlink(missing_ok=True)
        return await self._register(file_id, filename, purpose, size)

    async def write(self, file_id: str, filename: str, purpose: Purpose, content: bytes) -> FileRecord:
        """Store ``content`` under ``file_id`` (a batch's output), replacing what was there."""
        path = self.path(file_id)

        def write() -> None:
            self.directory.mkdir(parents=True, exist_ok=True)
            partial = path.with_suffix(".part")
            partial.write_bytes(content)
            os.replace(partial, path)

        await asyncio.to_thread(write)
        return await self._register(file_id, filename, purpose, len(content))

    async def _register(self, file_id: str, filename: str, purpose: Purpose, size: int) -> FileRecord:
        record = FileRecord(id=file_id, bytes=size, created_at=int(time.time()), filename=filename, purpose=purpose)
        async with self.connection.pipeline(transaction=True) as pipe:
            pipe.set(self.keys.file(file_id), record.model_dump_json())
            pipe.zadd(self.keys.files, {file_id: time.time()}, nx=True)
            await pipe.execute()
        return record

    async def get(self, file_id: str) -> FileRecord:
        self.path(file_id)  # the id's form, checked before it names a key
        raw = await self.connection.get(self.keys.file(file_id))
        if raw is None:
            raise NoSuchFileError(f"no file with id {file_id!r}", param="file_id")
        return FileRecord.model_validate_json(raw)

    async def read(self, file_id: str) -> bytes:
        await self.get(file_id)
        try:
            return await asyncio.to_thread(self.path(file_id).read_bytes)
        except FileNotFoundError:
            raise NoSuchFileError(
                f"the content of file {file_id!r} is missing from {self.directory} (server.files_dir)",
                param="file_id",
            ) from None

    async def listing(self, purpose: str | None = None) -> list[FileRecord]:
        """Every file, oldest first (a local server holds few; pagination is the caller's)."""
        members = await self.connection.zrange(self.keys.files, 0, -1)
        ids = [str(i.decode() if isinstance(i, bytes) else i) for i in members]
        if not ids:
            return []
        raws = await self.connection.mget([self.keys.file(i) for i in ids])
        records = [FileRecord.model_validate_json(raw) for raw in raws if raw is not None]
        return [r for r in records if purpose is None or r.purpose == purpose]

    async def delete(self, file_id: str) -> None:
        await self.get(file_id)
        async with self.connection.pipeline(transaction=True) as pipe:
            pipe.delete(self.keys.file(file_id))
            pipe.zrem(self.keys.files, file_id)
            await pipe.execute()
        await asyncio.to_thread(self.path(file_id).unlink, missing_ok=True)
