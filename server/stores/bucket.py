"""Where the stores keep their records: JSON strings by id, with a TTL, in Redis or in memory.

The Redis bucket is what lets records survive a server restart and be shared by several server
replicas; the memory bucket is for a single process (and for tests).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Protocol

import redis.asyncio


class Bucket(Protocol):
    async def get(self, key: str) -> str | None: ...

    async def put(self, key: str, value: str) -> None: ...

    async def delete(self, key: str) -> bool: ...


class RedisBucket:
    def __init__(self, connection: redis.asyncio.Redis, key: Callable[[str], str], ttl_seconds: int) -> None:
        self.connection = connection
        self.key = key
        self.ttl_seconds = ttl_seconds

    async def get(self, key: str) -> str | None:
        value = await self.connection.get(self.key(key))
        return value.decode() if isinstance(value, bytes) else value

    async def put(self, key: str, value: str) -> None:
        await self.connection.set(self.key(key), value, ex=self.ttl_seconds)

    async def delete(self, key: str) -> bool:
        return bool(await self.connection.delete(self.key(key)))


class MemoryBucket:
    def __init__(self, ttl_seconds: int, clock: Callable[[], float] = time.monotonic) -> None:
        self.ttl_seconds = ttl_seconds
        self.clock = clock
        self._items: dict[str, tuple[float, str]] = {}

    async def get(self, key: str) -> str | None:
        item = self._items.get(key)
        if item is None:
            return None
        expires, value = item
        if expires <= self.clock():
            del self._items[key]
            return None
        return value

    async def put(self, key: str, value: str) -> None:
        now = self.clock()
        # Expired entries are dropped on write so a long-lived process does not grow without end.
        for stale in [k for k, (expires, _) in self._items.items() if expires <= now]:
            del self._items[stale]
        self._items[key] = (now + self.ttl_seconds, value)

    async def delete(self, key: str) -> bool:
        return await self.get(key) is not None and self._items.pop(key, None) is not None
