"""The Batch API's stores and leases on a real Redis: files on disk with records in Redis, batch
status moves that two writers cannot undo, lines counted once, one lease holder per batch."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import TypeVar

import pytest
import redis.asyncio

from ollm.contract import Keys
from server.openai.batches.lease import Leases
from server.stores.batches import BatchRecord, BatchStore
from server.stores.files import FileStore, FileTooLargeError, NoSuchFileError, derived_file_id
from workers.redis_server import RedisServer

T = TypeVar("T")


def run(redis_server: RedisServer, scenario: Callable[[redis.asyncio.Redis, Keys], Awaitable[T]]) -> T:
    async def main() -> T:
        connection = redis.asyncio.Redis.from_url(redis_server.url)
        try:
            return await scenario(connection, Keys(f"s{uuid.uuid4().hex[:8]}"))
        finally:
            await connection.aclose()

    return asyncio.run(main())


async def chunks(*parts: bytes) -> AsyncIterator[bytes]:
    for part in parts:
        yield part


def test_files_live_on_disk_with_their_records_in_redis(redis_server: RedisServer, tmp_path: Path) -> None:
    async def scenario(connection: redis.asyncio.Redis, keys: Keys) -> None:
        store = FileStore(connection, keys, tmp_path / "files", max_bytes=10)
        first = await store.upload("a.jsonl", "batch", chunks(b"12345", b"678"))
        assert (first.bytes, first.filename, first.purpose) == (8, "a.jsonl", "batch")
        assert (tmp_path / "files" / f"{first.id}.jsonl").read_bytes() == b"12345678"
        assert await store.read(first.id) == b"12345678" and await store.get(first.id) == first
        with pytest.raises(FileTooLargeError, match="server.max_file_bytes"):
            await store.upload("big.jsonl", "batch", chunks(b"123456", b"78901"))
        assert sorted(p.name for p in (tmp_path / "files").iterdir()) == [f"{first.id}.jsonl"]  # nothing kept
        output = await store.write(derived_file_id("batch_1:output"), "out.jsonl", "batch_output", b"x\n")
        assert output.id == derived_file_id("batch_1:output") != derived_file_id("batch_1:error")
        assert [r.id for r in await store.listing()] == [first.id, output.id]
        assert [r.id for r in await store.listing("batch_output")] == [output.id]
        await store.delete(first.id)
        with pytest.raises(NoSuchFileError):
            await store.get(first.id)
        assert not (tmp_path / "files" / f"{first.id}.jsonl").exists()
        for hostile in ("../../etc/passwd", "file-../x", f"{first.id}/..", "file-" + "0" * 31):
            with pytest.raises(NoSuchFileError):
                await store.read(hostile)

    run(redis_server, scenario)


def record(batch_id: str) -> BatchRecord:
    return BatchRecord(
        id=batch_id, endpoint="/v1/embeddings", input_file_id="file-" + "0" * 32, completion_window="24h",
        status="validating", created_at=1, expires_at=2, metadata={"k": "v"},
    )  # fmt: skip


def test_batch_status_moves_only_from_the_states_named(redis_server: RedisServer) -> None:
    async def scenario(connection: redis.asyncio.Redis, keys: Keys) -> None:
        store = BatchStore(connection, keys)
        await store.create(record("batch_1"))
        assert await store.get("batch_1") == record("batch_1") and await store.active() == ["batch_1"]
        assert await store.move("batch_1", "in_progress", from_=("validating",))
        assert await store.move("batch_1", "cancelling", from_=("validating", "in_progress"))
        # The driver's step from in_progress no longer applies: the cancel stands.
        assert not await store.move("batch_1", "finalizing", from_=("in_progress",))
        assert await store.move("batch_1", "cancelled", from_=("cancelling",))
        done = await store.get("batch_1")
        assert done is not None and done.status == "cancelled" and done.cancelled_at and done.in_progress_at
        assert await store.active() == [] and not await store.move("missing", "failed", from_=("validating",))

    run(redis_server, scenario)


def test_a_line_finished_twice_counts_once(redis_server: RedisServer) -> None:
    async def scenario(connection: redis.asyncio.Redis, keys: Keys) -> None:
        store = BatchStore(connection, keys)
        await store.create(record("batch_2"))
        await store.update("batch_2", total=3, output_file_id="file-" + "1" * 32)
        assert await store.record("batch_2", 1, '{"a": 1}', ok=True)
        assert not await store.record("batch_2", 1, '{"a": 2}', ok=True)  # a resumed batch ran it again
        assert await store.record("batch_2", 2, '{"b": 1}', ok=False)
        got = await store.get("batch_2")
        assert got is not None and got.request_counts.model_dump() == {"total": 3, "completed": 1, "failed": 1}
        assert got.output_file_id == "file-" + "1" * 32
        assert await store.results("batch_2") == {1: '{"a": 1}', 2: '{"b": 1}'}
        assert [b.id for b in await store.listing()] == ["batch_2"]

    run(redis_server, scenario)


def test_one_lease_holder_per_batch(redis_server: RedisServer) -> None:
    async def scenario(connection: redis.asyncio.Redis, keys: Keys) -> list[bool]:
        mine, theirs = Leases(connection, keys, "me", 0.3), Leases(connection, keys, "them", 5)
        taken = [await mine.take("b"), await theirs.take("b"), await mine.renew("b"), await theirs.renew("b")]
        await theirs.release("b")  # not theirs to give back
        taken.append(await theirs.take("b"))
        await asyncio.sleep(0.5)  # mine ran out unrenewed (a dead server)
        taken += [await theirs.take("b"), await mine.renew("b")]
        await mine.release("b")
        taken.append(await theirs.renew("b"))
        return taken

    assert run(redis_server, scenario) == [True, False, True, False, False, True, False, True]
