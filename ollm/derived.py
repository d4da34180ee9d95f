"""Derived models: a name over a base model plus its own defaults (system prompt, parameters,
template, a conversation to start from), made by Ollama's /api/create and /api/copy.

A derived model holds no weights. It is a record in Redis (``Keys.derived_models``) that every
API family resolves the same way: the request goes to the base model's workers, with the derived
defaults applied under whatever the client sent (``apply``). A request resolves the name once,
when it arrives, so deleting the model does not disturb requests already running.
"""

from __future__ import annotations

import hashlib
import json
from datetime import UTC, datetime
from typing import Any

import redis.asyncio
from pydantic import BaseModel, Field

from ollm.contract import Keys
from ollm.generation import ChatMessage, GenerationRequest

# Ollama's option names -> the internal sampling parameter each one sets.
SAMPLING_OPTIONS = {
    "num_predict": "max_new_tokens",
    "temperature": "temperature",
    "top_p": "top_p",
    "top_k": "top_k",
    "min_p": "min_p",
    "seed": "seed",
    "stop": "stop",
    "repeat_penalty": "repetition_penalty",
    "repeat_last_n": "repeat_last_n",
    "frequency_penalty": "frequency_penalty",
    "presence_penalty": "presence_penalty",
}


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

    def sampling_defaults(self) -> dict[str, Any]:
        """The derived parameters that are sampling parameters, under their internal names."""
        out: dict[str, Any] = {}
        for option, value in self.parameters.items():
            name = SAMPLING_OPTIONS.get(option)
            if name is None or value is None:
                continue
            if name == "stop":
                value = [value] if isinstance(value, str) else list(value)
            elif name == "max_new_tokens" and int(value) <= 0:
                continue  # -1 / -2: no fixed budget, the configured default applies
            out[name] = value
        return out


class DerivedModels:
    """The derived models in Redis: one hash, name -> definition."""

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


def apply(request: GenerationRequest, derived: DerivedModel) -> GenerationRequest:
    """``request`` for the base model, with the derived defaults under what the client chose.

    Sampling parameters the client set (``sampling.model_fields_set``, see
    ``ollm.sampling_defaults``) win; a system message in the request replaces the derived system
    prompt, as in Ollama; a raw prompt gets neither system prompt nor conversation.
    """
    sampling = request.sampling
    chosen = sampling.model_fields_set
    defaults = {k: v for k, v in derived.sampling_defaults().items() if k not in chosen}
    update: dict[str, Any] = {"model": derived.base}
    if defaults:
        new_sampling = sampling.model_validate({**sampling.model_dump(), **defaults})
        # Chosen for this request now (the model's own recommendations, applied next, stay under them).
        new_sampling.__pydantic_fields_set__ = set(chosen) | set(defaults)
        update["sampling"] = new_sampling
    if request.messages is not None:
        preamble: list[ChatMessage] = []
        if derived.system and not any(m.role == "system" for m in request.messages):
            preamble.append(ChatMessage(role="system", content=derived.system))
        preamble += [
            ChatMessage(role=m.get("role", "user"), content=str(m.get("content") or "")) for m in derived.messages
        ]
        update["messages"] = [*preamble, *request.messages]
        if derived.template and request.chat_template is None:
            update["chat_template"] = derived.template
    return request.model_copy(update=update)
