"""Models: what live workers serve, in OpenAI's model object shape."""

from __future__ import annotations

from openai.types import Model

from ollm.errors import ModelNotFoundError
from server.services import Services
from workers.heartbeat import WorkerInfo


def to_models(workers: list[WorkerInfo]) -> list[Model]:
    """One entry per model reference; ``created`` is when its longest-running worker started."""
    started: dict[str, float] = {}
    for worker in workers:
        for model in worker.models:
            started[model] = min(started.get(model, worker.started_at), worker.started_at)
    return [Model(id=model, object="model", created=int(at), owned_by="ollm") for model, at in sorted(started.items())]


async def list_models(services: Services) -> list[Model]:
    return to_models(await services.dispatcher.workers())


async def retrieve_model(services: Services, model_id: str) -> Model:
    for model in await list_models(services):
        if model.id == model_id:
            return model
    raise ModelNotFoundError(
        f"model {model_id!r} is not served by any live worker; start one with `ollm worker --model {model_id}`"
    )
