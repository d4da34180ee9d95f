"""Models: every model a request may name, in OpenAI's model object shape.

That is what live workers serve, what is pulled here (loaded on first use) and the derived models
made by /api/create and /api/copy.
"""

from __future__ import annotations

import asyncio

from openai.types import Model

from ollm import catalogue
from ollm.contract import WorkerInfo
from ollm.errors import ModelNotFoundError
from server.services import Services


def to_models(workers: list[WorkerInfo], available: dict[str, float] | None = None) -> list[Model]:
    """One entry per model name; ``created`` is when its longest-running worker started, or, for a
    model no worker holds, when it was pulled or created (``available``: name -> epoch seconds)."""
    started: dict[str, float] = dict(available or {})
    for worker in workers:
        for model in worker.models:
            started[model] = min(started.get(model, worker.started_at), worker.started_at)
    return [Model(id=model, object="model", created=int(at), owned_by="ollm") for model, at in sorted(started.items())]


def _pulled(services: Services) -> dict[str, float]:
    return {
        listing.reference: listing.modified_at.timestamp() if listing.modified_at else 0.0
        for listing in catalogue.list_models(services.settings.runtime)
        if listing.availability == "materialized"
    }


async def list_models(services: Services) -> list[Model]:
    available = await asyncio.to_thread(_pulled, services)
    for derived in await services.dispatcher.derived.all():
        available[derived.name] = derived.created_at.timestamp()
    return to_models(await services.dispatcher.workers(), available)


async def retrieve_model(services: Services, model_id: str) -> Model:
    for model in await list_models(services):
        if model.id == model_id:
            return model
    raise ModelNotFoundError(
        f"model {model_id!r} is neither pulled here, served by a live worker nor created; "
        f"pull it with `ollm pull {model_id}`"
    )
