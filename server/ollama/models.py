"""Which model an Ollama name means: a created (derived) model over its base, or a model ollm knows.

Ollama names carry a tag (``smollm2-135m-instruct:latest``); ollm references do not, so the
default tag is dropped. A name is usable when a live worker serves it or it is materialized here;
anything else gets Ollama's "model not found, try pulling it first" (404).
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from ollm import catalogue
from ollm.derived import DerivedModel, DerivedModels
from ollm.errors import InvalidRequestError, ModelNameClashError, OllmError
from ollm.generation import GenerationRequest
from ollm.references import MAX_REFERENCE_LENGTH
from server.ollama.errors import OllamaModelNotFound
from server.ollama.serving import model_name
from server.services import Services

# A created model's name: Ollama's [namespace/]name[:tag], without path tricks.
_FORBIDDEN = ("..", "//", "\\")


@dataclass
class Resolved:
    """``base``: the model reference workers serve (the queue name); ``derived``: its defaults."""

    base: str
    derived: DerivedModel | None


def registry(services: Services) -> DerivedModels:
    return DerivedModels(services.connection, services.keys)


async def base_name(services: Services, name: str) -> str | None:
    """The name to dispatch ``name`` under, or None when no worker serves it and it is not here."""
    if await services.dispatcher.serves(name):
        return name
    try:
        ref = await asyncio.to_thread(catalogue.resolve, name, services.settings.runtime)
    except ModelNameClashError:
        raise  # the name is here twice: say so rather than "not found"
    except OllmError:
        return None
    if ref.name != name and await services.dispatcher.serves(ref.name):
        return ref.name
    materialized = await asyncio.to_thread(catalogue.is_materialized, ref, services.settings.runtime)
    return ref.name if materialized else None


async def resolve(services: Services, name: str) -> Resolved:
    short = model_name(name)
    derived = await registry(services).get(short)
    base = await base_name(services, derived.base if derived else short)
    if base is None:
        raise OllamaModelNotFound(name)
    return Resolved(base, derived)


def check_new_name(name: str, services: Services) -> str:
    """A name /api/create or /api/copy may give a model; returns it without the default tag. A
    name that is already a model's (an alias, a directory in models_dir) is refused: the created
    model would hide it."""
    short = model_name(name)
    if (
        not short
        or short.startswith(("/", ".", "~"))
        or any(bad in short for bad in _FORBIDDEN)
        or len(short) > MAX_REFERENCE_LENGTH
        or not short.isprintable()
    ):
        raise InvalidRequestError(f"invalid model name {name[:64]!r}", param="model")
    if catalogue.find_alias(short) is not None:
        raise InvalidRequestError(f"{name!r} is a built-in model; choose another name", param="model")
    directory = services.settings.runtime.resolved_models_dir() / short
    if catalogue.is_model_dir(directory):
        raise InvalidRequestError(f"{name!r} is the model directory {directory}; choose another name", param="model")
    return short


def kind_of(services: Services, base: str) -> str | None:
    """The model's kind (causal-lm, embedding, ...) from the catalogue or its config.json, if known here."""
    try:
        ref = catalogue.resolve(base, services.settings.runtime)
    except OllmError:
        return None
    entry = catalogue.find_alias(ref.name) if ref.kind == "alias" else None
    if entry is not None:
        return entry.kind
    path = catalogue.materialized_path(ref, services.settings.runtime)
    config = catalogue.read_json(path / "config.json") if path else None
    return catalogue.detect_kind(config, path) if config is not None else None


def capabilities_of(services: Services, base: str) -> list[str]:
    """The model's capabilities (ollm.catalogue's names) from its directory, or the catalogue's entry."""
    try:
        ref = catalogue.resolve(base, services.settings.runtime)
    except OllmError:
        return []
    path = catalogue.materialized_path(ref, services.settings.runtime)
    config = catalogue.read_json(path / "config.json") if path else None
    if path is not None and config is not None:
        return list(catalogue.capabilities_of(catalogue.detect_kind(config, path), path))
    entry = catalogue.find_alias(ref.name) if ref.kind == "alias" else None
    return list(entry.capabilities) if entry else []


async def require_thinking(services: Services, resolved: Resolved, name: str, request: GenerationRequest) -> None:
    """Ollama's 400 for ``think`` on a model that cannot think; clients read it to retry without."""
    if request.think in (None, False):
        return
    if "thinking" not in await asyncio.to_thread(capabilities_of, services, resolved.base):
        raise InvalidRequestError(f'"{name}" does not support thinking', param="think")


async def require_kind(services: Services, resolved: Resolved, name: str, action: str) -> None:
    """Ollama's 400 for a model used for what it cannot do (an embedding model asked to chat)."""
    kind = await asyncio.to_thread(kind_of, services, resolved.base)
    generates = kind != "embedding"
    if kind is not None and generates != (action != "embed"):
        raise InvalidRequestError(f'"{name}" does not support {action}', param="model")
