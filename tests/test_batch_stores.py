"""The Batch API's stores and leases on a real Redis: files on disk with records in Redis, batch
status moves that two writers cannot undo, lines counted once, one lease holder per batch, listings
paged from their index, expiry, the cap on active batches and orphaned ``.part`` files."""

from __future__ import annotations

import asyncio
import fcntl
import os
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import TypeVar

import pytest
import redis.asyncio

from ollm.contract import Keys
from ollm.errors import InvalidRequestError
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
        first = await store.upload("a.jsonl", "batch", chunks(b"12345", b"678"), 3600)
        assert (first.bytes, first.filename, first.purpose) == (8, "a.jsonl", "batch")
        assert first.expires_at == first.created_at + 3600
        assert (tmp_path / "files" / f"{first.id}.jsonl").read_bytes() == b"12345678"
        assert (await store.content(first.id)).read_bytes() == b"12345678" and await store.get(first.id) == first
        with pytest.raises(FileTooLargeError, match="server.max_file_bytes"):
            await store.upload("big.jsonl", "batch", chunks(b"123456", b"78901"), None)
        assert sorted(p.name for p in (tmp_path / "files").iterdir()) == [f"{first.id}.jsonl"]  # nothing kept
        output = await store.write(derived_file_id("batch_1:output"), "out.jsonl", "batch_output", chunks(b"x\n"), None)
        assert output.id == derived_file_id("batch_1:output") != derived_file_id("batch_1:error")
        assert output.expires_at is None
        assert await store.listing(None, None, 10, newest_first=False) == ([first, output], False)
        assert await store.listing("batch_output", None, 10, newest_first=True) == ([output], False)
        await store.delete(first.id)
        with pytest.raises(NoSuchFileError):
            await store.get(first.id)
        assert not (tmp_path / "files" / f"{first.id}.jsonl").exists()
        for hostile in ("../../etc/passwd", "file-../x", f"{first.id}/..", "file-" + "0" * 31):
            with pytest.raises(NoSuchFileError):
                await store.content(hostile)

    run(redis_server, scenario)


def record(batch_id: str) -> BatchRecord:
    return BatchRecord(
        id=batch_id, endpoint="/v1/embeddings", input_file_id="file-" + "0" * 32, completion_window="24h",
        status="validating", created_at=1, expires_at=2, metadata={"k": "v"},
    )  # fmt: skip


def test_batch_status_moves_only_from_the_states_named(redis_server: RedisServer) -> None:
    async def scenario(connection: redis.asyncio.Redis, keys: Keys) -> None:
        store = BatchStore(connection, keys, retention_seconds=60)
        assert await store.create(record("batch_1"), max_active=1, output_expires_after=None)
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
        store = BatchStore(connection, keys, retention_seconds=60)
        assert await store.create(record("batch_2"), max_active=1, output_expires_after=3600)
        assert await store.output_expires_after("batch_2") == 3600
        await store.update("batch_2", total=3, output_file_id="file-" + "1" * 32)
        assert await store.record("batch_2", 1, '{"a": 1}', ok=True)
        assert not await store.record("batch_2", 1, '{"a": 2}', ok=True)  # a resumed batch ran it again
        assert await store.record("batch_2", 2, '{"b": 1}', ok=False)
        got = await store.get("batch_2")
        assert got is not None and got.request_counts.model_dump() == {"total": 3, "completed": 1, "failed": 1}
        assert got.output_file_id == "file-" + "1" * 32
        assert [r async for r in store.results("batch_2", 3)] == [(1, '{"a": 1}'), (2, '{"b": 1}')]
        done = await store.done("batch_2")
        assert (0 in done, 1 in done, 2 in done, 3 in done, 50_000 in done) == (False, True, True, False, False)
        assert await store.listing(None, 20) == ([got], False)
        await store.drop_results("batch_2")
        assert [r async for r in store.results("batch_2", 3)] == [] and 1 not in await store.done("batch_2")

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


def test_listings_are_paged_from_their_index(redis_server: RedisServer, tmp_path: Path) -> None:
    async def scenario(connection: redis.asyncio.Redis, keys: Keys) -> None:
        files = FileStore(connection, keys, tmp_path, max_bytes=100)
        made = [await files.upload(f"{i}.jsonl", "batch", chunks(b"x"), None) for i in range(5)]
        ids = [f.id for f in made]
        first, more = await files.listing("batch", None, 2, newest_first=True)
        assert [f.id for f in first] == ids[:2:-1][:2] == [ids[4], ids[3]] and more
        rest, more = await files.listing("batch", ids[3], 10, newest_first=True)
        assert [f.id for f in rest] == [ids[2], ids[1], ids[0]] and not more
        ascending, more = await files.listing(None, ids[1], 3, newest_first=False)
        assert [f.id for f in ascending] == ids[2:5] and not more
        with pytest.raises(InvalidRequestError, match="after"):
            await files.listing(None, "file-" + "9" * 32, 2, newest_first=True)
        assert await files.listing("batch_output", None, 2, newest_first=True) == ([], False)

        batches = BatchStore(connection, keys, retention_seconds=60)
        for i in range(3):
            assert await batches.create(record(f"batch_{i}"), max_active=10, output_expires_after=None)
        page, more = await batches.listing(None, 2)
        assert [b.id for b in page] == ["batch_2", "batch_1"] and more
        page, more = await batches.listing("batch_1", 2)
        assert [b.id for b in page] == ["batch_0"] and not more

    run(redis_server, scenario)


def test_expired_files_and_batches_are_gone_and_swept(redis_server: RedisServer, tmp_path: Path) -> None:
    async def scenario(connection: redis.asyncio.Redis, keys: Keys) -> None:
        files = FileStore(connection, keys, tmp_path, max_bytes=100)
        kept = await files.upload("kept.jsonl", "batch", chunks(b"x"), None)
        going = await files.upload("going.jsonl", "batch", chunks(b"y"), 1)
        await asyncio.sleep(1.1)
        with pytest.raises(NoSuchFileError):
            await files.get(going.id)  # expired: gone at once, swept or not
        assert await files.listing(None, None, 10, newest_first=False) == ([kept], False)
        assert await files.sweep() == 1
        assert not (tmp_path / f"{going.id}.jsonl").exists() and (tmp_path / f"{kept.id}.jsonl").exists()
        assert await connection.zcard(keys.files) == 1 and await connection.exists(keys.file(going.id)) == 0

        batches = BatchStore(connection, keys, retention_seconds=0.5)
        assert await batches.create(record("old"), max_active=10, output_expires_after=None)
        assert await batches.create(record("running"), max_active=10, output_expires_after=None)
        assert await batches.move("old", "failed", from_=("validating",))
        assert await batches.sweep() == 0  # kept retention_seconds after it ended
        await asyncio.sleep(0.6)
        assert await batches.sweep() == 1
        assert await batches.get("old") is None and await batches.get("running") is not None
        assert [b.id for b in (await batches.listing(None, 10))[0]] == ["running"]

    run(redis_server, scenario)


def test_no_batch_is_created_past_the_cap_on_active_batches(redis_server: RedisServer) -> None:
    async def scenario(connection: redis.asyncio.Redis, keys: Keys) -> None:
        store = BatchStore(connection, keys, retention_seconds=60)
        assert await store.create(record("a"), max_active=2, output_expires_after=None)
        assert await store.create(record("b"), max_active=2, output_expires_after=None)
        assert not await store.create(record("c"), max_active=2, output_expires_after=None)
        assert await store.get("c") is None and await store.active() == ["a", "b"]
        assert await store.move("a", "cancelled", from_=("validating",))  # a place frees up
        assert await store.create(record("c"), max_active=2, output_expires_after=None)

    run(redis_server, scenario)


def test_orphaned_part_files_are_removed_and_live_ones_kept(redis_server: RedisServer, tmp_path: Path) -> None:
    async def scenario(connection: redis.asyncio.Redis, keys: Keys) -> None:
        orphan, live, young = (tmp_path / f"file-{c * 32}.part" for c in "abc")
        for path in (orphan, live, young):
            path.write_bytes(b"half an upload")
        old = time.time() - 60
        os.utime(orphan, (old, old))
        os.utime(live, (old, old))
        with live.open("rb") as writer:  # a writer still at it, as FileStore.write holds it
            fcntl.flock(writer, fcntl.LOCK_EX)
            await FileStore(connection, keys, tmp_path, max_bytes=100).sweep()
        assert (orphan.exists(), live.exists(), young.exists()) == (False, True, True)

    run(redis_server, scenario)
