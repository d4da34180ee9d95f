"""Stored responses: the response object as returned, its input items, and the conversation so far.

``previous_response_id`` chaining continues from ``messages`` (the whole history in the internal
form, the response's own output included), so a follow-up needs one read, not a walk of the chain.
Backends: ``redis`` (default; survives restarts, shared by replicas), ``memory``, ``none``.
"""

from __future__ import annotations

import time
from typing import Any

import redis.asyncio
from pydantic import BaseModel, Field

from ollm.contract import Keys
from ollm.generation import ChatMessage
from ollm.settings import ServerSettings
from server.stores.bucket import Bucket, MemoryBucket, RedisBucket


class StoredResponse(BaseModel):
    id: str
    response: dict[str, Any] = Field(description="The API object exactly as it was returned.")
    input_items: list[dict[str, Any]] = Field(default_factory=list)
    messages: list[ChatMessage] = Field(default_factory=list, description="Conversation including the output.")
    created_at: float = Field(default_factory=time.time)


class ResponseStore:
    def __init__(self, bucket: Bucket | None) -> None:
        self._bucket = bucket

    @property
    def enabled(self) -> bool:
        """False for backend ``none``: nothing is kept, and retrieval routes should say so."""
        return self._bucket is not None

    async def put(self, response_id: str, record: StoredResponse) -> None:
        if self._bucket is not None:
            await self._bucket.put(response_id, record.model_dump_json())

    async def get(self, response_id: str) -> StoredResponse | None:
        if self._bucket is None:
            return None
        raw = await self._bucket.get(response_id)
        return StoredResponse.model_validate_json(raw) if raw is not None else None

    async def delete(self, response_id: str) -> bool:
        return self._bucket is not None and await self._bucket.delete(response_id)


def response_store(server: ServerSettings, connection: redis.asyncio.Redis, keys: Keys) -> ResponseStore:
    if server.response_store_backend == "none":
        return ResponseStore(None)
    if server.response_store_backend == "memory":
        return ResponseStore(MemoryBucket(server.response_ttl_seconds))
    return ResponseStore(RedisBucket(connection, keys.response, server.response_ttl_seconds))
