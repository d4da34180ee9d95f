"""Files of /v1/files: the content on disk under ``server.files_dir``, the record in Redis.

A file is ``<files_dir>/<id>.jsonl`` with its record (OpenAI's FileObject as JSON) at
``<ns>:file:<id>``, its id in the sorted sets ``<ns>:files`` and ``<ns>:files-of:<purpose>`` (by
creation: listings are read a page at a time from them) and, when it expires, in
``<ns>:files-expiry`` (by expiry). Uploads and batch outputs survive restarts and every server
replica sharing the directory sees them. Ids are issued here (``file-`` and 32 hex digits) and a
client's id must have exactly that form before it names a path, so no id reaches outside the
directory.

Content is never held in memory: it is written chunk by chunk to ``<id>.part`` (under an exclusive
``flock`` while it is written) and renamed into place, and read back from disk. ``sweep`` removes
expired files and the ``.part`` files of writers that died (their lock is free).
"""

from __future__ import annotations

import asyncio
import fcntl
import hashlib
import os
import re
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Literal, get_args

import redis.asyncio
from pydantic import BaseModel

from ollm.contract import Keys
from ollm.errors import OllmError
from server.stores.index import page_ids, text

_FILE_ID = re.compile(r"file-[0-9a-f]{32}")
# A .part file this young may be one whose writer has not taken its lock yet.
_YOUNG_SECONDS = 5.0
# Expired files removed per Redis round trip of a sweep.
_SWEEP_BATCH = 100

# user_data / assistants: files a request names as input (server/documents.py reads them).
Purpose = Literal["batch", "batch_output", "user_data", "assistants"]
PURPOSES: tuple[str, ...] = get_args(Purpose)

# OpenAI's: a file may be kept from 1 hour to 30 days; files with purpose ``batch`` expire after
# 30 days unless the upload says otherwise, others are kept until deleted.
MIN_EXPIRY_SECONDS = 3600
MAX_EXPIRY_SECONDS = 30 * 24 * 3600
DEFAULT_EXPIRY: dict[str, int | None] = {"batch": MAX_EXPIRY_SECONDS}


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

    def expired(self, now: float) -> bool:
        return self.expires_at is not None and now >= self.expires_at


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

    async def upload(
        self, filename: str, purpose: Purpose, chunks: AsyncIterator[bytes], expires_after: int | None
    ) -> FileRecord:
        """Store an upload chunk by chunk; over ``max_bytes`` nothing is kept and it is a 413."""
        return await self.write(new_file_id(), filename, purpose, chunks, expires_after, limit=self.max_bytes)

    async def write(
        self,
        file_id: str,
        filename: str,
        purpose: Purpose,
        chunks: AsyncIterator[bytes],
        expires_after: int | None,
        *,
        limit: int | None = None,
    ) -> FileRecord:
        """Store ``chunks`` under ``file_id`` (replacing what was there: a batch's output is
        rewritten whole when finalizing is redone). ``expires_after``: seconds from now."""
        path = self.path(file_id)
        partial = path.with_suffix(".part")
        await asyncio.to_thread(self.directory.mkdir, parents=True, exist_ok=True)
        size = 0
        try:
            with partial.open("wb") as out:
                fcntl.flock(out, fcntl.LOCK_EX)  # released when closed, or when this process dies
                async for chunk in chunks:
                    size += len(chunk)
                    if limit is not None and size > limit:
                        raise FileTooLargeError(
                            f"the file is larger than {limit} bytes (server.max_file_bytes); "
                            "split it into several files and batches",
                            param="file",
                        )
                    await asyncio.to_thread(out.write, chunk)
                await asyncio.to_thread(out.flush)
                await asyncio.to_thread(os.replace, partial, path)
        finally:
            partial.unlink(missing_ok=True)
        now = time.time()
        expires_at = None if expires_after is None else int(now) + expires_after
        record = FileRecord(
            id=file_id, bytes=size, created_at=int(now), filename=filename, purpose=purpose, expires_at=expires_at
        )
        async with self.connection.pipeline(transaction=True) as pipe:
            pipe.set(self.keys.file(file_id), record.model_dump_json())
            pipe.zadd(self.keys.files, {file_id: now}, nx=True)
            pipe.zadd(self.keys.files_of(purpose), {file_id: now}, nx=True)
            if expires_at is not None:
                pipe.zadd(self.keys.files_expiry, {file_id: expires_at})
            await pipe.execute()
        return record

    async def get(self, file_id: str) -> FileRecord:
        """The record; an expired file is gone (whether or not a sweep has removed it yet)."""
        self.path(file_id)  # the id's form, checked before it names a key
        raw = await self.connection.get(self.keys.file(file_id))
        record = None if raw is None else FileRecord.model_validate_json(raw)
        if record is None or record.expired(time.time()):
            raise NoSuchFileError(f"no file with id {file_id!r}", param="file_id")
        return record

    async def content(self, file_id: str) -> Path:
        """Where the file's content is on disk, once it is known to be there (read it from there:
        a file can be as large as ``server.max_file_bytes``)."""
        await self.get(file_id)
        path = self.path(file_id)
        if not await asyncio.to_thread(path.is_file):
            raise NoSuchFileError(
                f"the content of file {file_id!r} is missing from {self.directory} (server.files_dir)", param="file_id"
            )
        return path

    async def listing(
        self, purpose: str | None, after: str | None, limit: int, *, newest_first: bool
    ) -> tuple[list[FileRecord], bool]:
        """One page of files (of ``purpose``, or all) and whether more follow."""
        index = self.keys.files if purpose is None else self.keys.files_of(purpose)
        ids, has_more = await page_ids(self.connection, index, after, limit, newest_first=newest_first)
        if not ids:
            return [], has_more
        now = time.time()
        raws = await self.connection.mget([self.keys.file(i) for i in ids])
        records = (FileRecord.model_validate_json(raw) for raw in raws if raw is not None)
        return [r for r in records if not r.expired(now)], has_more

    async def delete(self, file_id: str) -> None:
        record = await self.get(file_id)
        await self._remove(file_id, record.purpose)

    async def _remove(self, file_id: str, purpose: str | None) -> None:
        async with self.connection.pipeline(transaction=True) as pipe:
            pipe.delete(self.keys.file(file_id))
            pipe.zrem(self.keys.files, file_id)
            for kind in (purpose,) if purpose else PURPOSES:
                pipe.zrem(self.keys.files_of(kind), file_id)
            pipe.zrem(self.keys.files_expiry, file_id)
            await pipe.execute()
        await asyncio.to_thread(self.path(file_id).unlink, missing_ok=True)

    async def sweep(self) -> int:
        """Remove expired files (record, listings, content) and orphaned ``.part`` files; how many
        expired files went."""
        removed = 0
        while ids := await self.connection.zrangebyscore(
            self.keys.files_expiry, "-inf", time.time(), start=0, num=_SWEEP_BATCH
        ):
            for file_id in map(text, ids):
                await self._remove(file_id, None)
                removed += 1
        await asyncio.to_thread(remove_orphaned_parts, self.directory)
        return removed


def remove_orphaned_parts(directory: Path) -> list[Path]:
    """Remove the ``.part`` files no live writer holds (a crash mid-upload or mid-output)."""
    removed = []
    for partial in directory.glob("*.part"):
        try:
            if partial.stat().st_mtime > time.time() - _YOUNG_SECONDS:
                continue
            with partial.open("rb") as handle:
                try:
                    fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    continue  # being written right now
                partial.unlink()
                removed.append(partial)
        except FileNotFoundError:
            continue  # renamed into place or removed meanwhile
    return removed
