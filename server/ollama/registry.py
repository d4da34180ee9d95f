"""Models created with /api/create (and /api/copy): a name over a base model plus its own defaults.

A derived model holds no weights: it is a Redis record ``name -> {base, system, template,
parameters, messages}``. The server resolves the name to its base model at request time and
applies the defaults, so the base model's workers serve it without loading a second copy.
"""

from __future__ import annotations

import hashlib
import json
from datetime import UTC, datetime
from typing import Any

import redis.asyncio
from pydantic import BaseModel, Field

from workers.keys import Keys


class DerivedModel(BaseModel):
    name: str
    base: str
    system: str | None = None
    template: str | None = None
    parameters: dict[str, Any] = Field(default_factory=dict)
    # A conversation prepended to every request (Ollama's MESSAGE lines), as Ollama message dicts.
    messages: list[dict[str, Any]] = Field(default_factory=list)
    license: str | None = None
    created_at: datetime = Field(default_factory=lambda: datetime.now(UTC))

    @property
    def digest(self) -> str:
        """Content digest of the definition (the name and creation time excluded): copies share it."""
        body = self.model_dump(mode="json", exclude={"name", "created_at"})
        return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


class Registry:
    def __init__(self, connection: redis.asyncio.Redis, keys: Keys) -> None:
        self.connection = connection
        self.key = keys.derived_models

    async def get(self, name: str) -> DerivedModel | None:
        raw = await self.connection.hget(self.key, name)
        return DerivedModel.model_validate_json(raw) if raw else None

    async def put(self, model: DerivedModel) -> None:
        await self.connection.hset(self.key, model.name, model.model_dump_json())

    async def delete(self, name: str) -> bool:
        return bool(await self.connection.hdel(self.key, name))

    async def all(self) -> list[DerivedModel]:
        raw = await self.connection.hgetall(self.key)
        return sorted((DerivedModel.model_validate_json(v) for v in raw.values()), key=lambda m: m.name)
