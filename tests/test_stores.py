"""Response and session stores over each backend (fakeredis stands in for Redis)."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import fakeredis
import pytest

from ollm.contract import Keys
from ollm.generation import ChatMessage
from ollm.settings import ServerSettings
from server.stores.bucket import MemoryBucket
from server.stores.responses import StoredResponse, response_store
from server.stores.sessions import session_store

KEYS = Keys("ns")


@pytest.fixture
def connection() -> Iterator[fakeredis.FakeAsyncRedis]:
    yield fakeredis.FakeAsyncRedis(server=fakeredis.FakeServer())


def record(response_id: str = "resp_1") -> StoredResponse:
    return StoredResponse(
        id=response_id,
        response={"id": response_id, "object": "response"},
        input_items=[{"type": "message", "role": "user", "content": "hi"}],
        messages=[ChatMessage(role="user", content="hi"), ChatMessage(role="assistant", content="hello")],
    )


@pytest.mark.parametrize("backend", ["redis", "memory"])
def test_response_store_round_trip(backend: str, connection: fakeredis.FakeAsyncRedis) -> None:
    store = response_store(ServerSettings(response_store_backend=backend), connection, KEYS)

    async def scenario() -> None:
        assert store.enabled
        stored = record()
        await store.put("resp_1", stored)
        assert await store.get("resp_1") == stored
        assert await store.get("resp_2") is None
        assert await store.delete("resp_1") is True
        assert await store.delete("resp_1") is False
        assert await store.get("resp_1") is None

    asyncio.run(scenario())


def test_redis_response_keys_are_namespaced_with_a_ttl(connection: fakeredis.FakeAsyncRedis) -> None:
    settings = ServerSettings(response_ttl_seconds=120)
    store = response_store(settings, connection, KEYS)

    async def scenario() -> None:
        await store.put("resp_1", record())
        assert await connection.keys("*") == [b"ns:response:resp_1"]
        assert 0 < await connection.ttl("ns:response:resp_1") <= 120

    asyncio.run(scenario())


def test_response_store_none_keeps_nothing(connection: fakeredis.FakeAsyncRedis) -> None:
    store = response_store(ServerSettings(response_store_backend="none"), connection, KEYS)

    async def scenario() -> None:
        assert not store.enabled
        await store.put("resp_1", record())
        assert await store.get("resp_1") is None
        assert await store.delete("resp_1") is False
        assert await connection.keys("*") == []

    asyncio.run(scenario())


@pytest.mark.parametrize("backend", ["redis", "memory"])
def test_session_store(backend: str, connection: fakeredis.FakeAsyncRedis) -> None:
    store = session_store(ServerSettings(session_backend=backend), connection, KEYS)

    async def scenario() -> None:
        session = await store.create("echo", system="be brief")
        session.messages += [ChatMessage(role="user", content="a"), ChatMessage(role="assistant", content="b")]
        await store.save(session)
        loaded = await store.get(session.id)
        assert loaded is not None and loaded.messages == session.messages
        assert [m.role for m in loaded.conversation("next")] == ["system", "user", "assistant", "user"]
        assert await store.delete(session.id)
        assert await store.get(session.id) is None

    asyncio.run(scenario())


def test_sessions_live_in_redis_by_default_and_in_memory_when_asked(connection: fakeredis.FakeAsyncRedis) -> None:
    # In Redis they survive `ollm serve` restarts (embedded mode persists its Redis).
    kept = session_store(ServerSettings(), connection, KEYS)
    local = session_store(ServerSettings(session_backend="memory"), connection, KEYS)

    async def scenario() -> None:
        session = await kept.create("echo")
        assert await connection.keys("*") == [KEYS.session(session.id).encode()]
        await local.create("echo")
        assert len(await connection.keys("*")) == 1

    asyncio.run(scenario())


def test_memory_bucket_expires_entries() -> None:
    now = [1000.0]
    bucket = MemoryBucket(ttl_seconds=10, clock=lambda: now[0])

    async def scenario() -> None:
        await bucket.put("a", "1")
        now[0] += 9
        assert await bucket.get("a") == "1"
        now[0] += 2
        assert await bucket.get("a") is None
        await bucket.put("b", "2")
        now[0] += 11
        await bucket.put("c", "3")  # a write sweeps what expired
        assert list(bucket._items) == ["c"]

    asyncio.run(scenario())


def test_namespace_rq_is_refused() -> None:
    from ollm.errors import SettingsError

    with pytest.raises(SettingsError, match="collide"):
        Keys("rq")
