"""Native chat sessions: a model, an optional system prompt and the messages so far.

In memory by default (as the seed has it); ``server.session_backend = redis`` keeps them in Redis
so they survive restarts and are shared by server replicas. Every save renews the TTL.
"""

from __future__ import annotations

import time
import uuid

import redis.asyncio
from pydantic import BaseModel, Field

from ollm.contract import Keys
from ollm.generation import ChatMessage
from ollm.settings import ServerSettings
from server.stores.bucket import Bucket, MemoryBucket, RedisBucket


class Session(BaseModel):
    id: str = Field(default_factory=lambda: f"sess_{uuid.uuid4().hex}")
    model: str
    system: str | None = None
    messages: list[ChatMessage] = Field(default_factory=list)
    created_at: float = Field(default_factory=time.time)
    updated_at: float = Field(default_factory=time.time)

    def conversation(self, prompt: str) -> list[ChatMessage]:
        """The messages to send for one more user turn."""
        system = [ChatMessage(role="system", content=self.system)] if self.system else []
        return [*system, *self.messages, ChatMessage(role="user", content=prompt)]


class SessionStore:
    def __init__(self, bucket: Bucket) -> None:
        self._bucket = bucket

    async def create(self, model: str, system: str | None = None) -> Session:
        session = Session(model=model, system=system)
        await self.save(session)
        return session

    async def get(self, session_id: str) -> Session | None:
        raw = await self._bucket.get(session_id)
        return Session.model_validate_json(raw) if raw is not None else None

    async def save(self, session: Session) -> None:
        session.updated_at = time.time()
        await self._bucket.put(session.id, session.model_dump_json())

    async def delete(self, session_id: str) -> bool:
        return await self._bucket.delete(session_id)


def session_store(server: ServerSettings, connection: redis.asyncio.Redis, keys: Keys) -> SessionStore:
    if server.session_backend == "redis":
        return SessionStore(RedisBucket(connection, keys.session, server.session_ttl_seconds))
    return SessionStore(MemoryBucket(server.session_ttl_seconds))
