"""Native routes over the shared dispatch: translation to and from the internal model is pure."""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from typing import Any

import redis
from fastapi import Request
from fastapi.responses import JSONResponse, Response

from ollm import catalogue
from ollm.contract import WorkerInfo
from ollm.errors import ModelNotFoundError
from ollm.generation import ChatMessage, ContentPart, ErrorEvent, Event, FinalEvent, GenerationRequest, TokenEvent
from ollm.redis_tls import explain
from ollm.sampling_defaults import sampling_params
from ollm.settings import GenerationSettings, RuntimeSettings
from server.errors import error_body
from server.native.protocol import (
    HealthResponse,
    LoadUnderWay,
    ModelServing,
    PlanRequest,
    PromptResponse,
    RedisStatus,
    SamplingOptions,
    TokenChunk,
    Usage,
)
from server.services import Services
from server.sse import event_stream, first_event, sse
from server.stores.sessions import Session

# ---- pure translation ------------------------------------------------------------------------


def to_generation_request(
    model: str, messages: list[ChatMessage], options: SamplingOptions, defaults: GenerationSettings
) -> GenerationRequest:
    return GenerationRequest(
        model=model,
        messages=messages,
        sampling=sampling_params(defaults, **options.sampling_overrides()),
        think=options.think,
    )


def prompt_messages(prompt: str, system: str | None, audio: list[str] | None = None) -> list[ChatMessage]:
    system_messages = [ChatMessage(role="system", content=system)] if system else []
    content: str | list[ContentPart] = prompt
    if audio:
        content = [*(ContentPart(type="audio", audio=data) for data in audio), ContentPart(type="text", text=prompt)]
    return [*system_messages, ChatMessage(role="user", content=content)]


def to_prompt_response(request: GenerationRequest, final: FinalEvent, session_id: str | None = None) -> PromptResponse:
    usage = Usage(
        prompt_tokens=final.usage.prompt_tokens,
        completion_tokens=final.usage.completion_tokens,
        total_tokens=final.usage.total_tokens,
    )
    return PromptResponse(
        id=request.id, model=request.model, text=final.text, reasoning=final.reasoning,
        finish_reason=final.finish_reason, usage=usage,
        timings=final.timings, execution=final.execution, session_id=session_id,
    )  # fmt: skip


def stream_frames(request: GenerationRequest, session_id: str | None = None) -> Any:
    """The native SSE event family: ``token``, then one ``final`` or ``error``."""

    def frames(event: Event) -> Iterable[str]:
        if isinstance(event, TokenEvent):
            chunk = TokenChunk(id=request.id, text=event.text, reasoning=event.reasoning)
            return [sse(chunk.model_dump(), event="token")]
        if isinstance(event, FinalEvent):
            return [sse(to_prompt_response(request, event, session_id).model_dump(mode="json"), event="final")]
        assert isinstance(event, ErrorEvent)
        return [sse(error_body(event.status, event.message, code=event.code), event="error")]

    return frames


def model_serving(workers: list[WorkerInfo]) -> dict[str, ModelServing]:
    """Per model: the workers serving it and the loads of it under way."""
    served: dict[str, ModelServing] = {}

    def entry(model: str) -> ModelServing:
        return served.setdefault(model, ModelServing(workers=0, hosts=[], in_flight=0))

    for worker in workers:
        for model in worker.models:
            serving = entry(model)
            serving.workers += 1
            serving.in_flight += worker.in_flight
            if worker.host not in serving.hosts:
                serving.hosts.append(worker.host)
        if worker.loading is not None:
            entry(worker.loading.model).loading.append(load_under_way(worker))
    return served


def load_under_way(worker: WorkerInfo) -> LoadUnderWay:
    load = worker.loading
    assert load is not None
    return LoadUnderWay(
        worker=worker.name, bytes_read=load.bytes_read, bytes_total=load.bytes_total, progress=load.progress,
        started_at=load.started_at,
    )  # fmt: skip


def runtime_for(base: RuntimeSettings, plan: PlanRequest) -> RuntimeSettings:
    """The runtime settings a plan request asks about: the server's, with the request's overrides."""
    overrides = plan.model_dump(exclude={"model", "context_tokens"}, exclude_none=True)
    return RuntimeSettings.model_validate({**base.model_dump(), **overrides})


# ---- wiring ----------------------------------------------------------------------------------


async def health(services: Services) -> JSONResponse:
    try:
        # Reading the worker registry is the Redis check too: it raises as a ping would.
        workers = await services.dispatcher.workers()
    except redis.RedisError as exc:
        body = HealthResponse(
            status="degraded", redis=RedisStatus(status="unavailable", error=explain(exc)), models={}, workers=[]
        )
        return JSONResponse(body.model_dump(mode="json"), status_code=503)
    body = HealthResponse(status="ok", redis=RedisStatus(status="ok"), models=model_serving(workers), workers=workers)
    return JSONResponse(body.model_dump(mode="json"))


async def list_models(services: Services) -> dict[str, Any]:
    served = model_serving(await services.dispatcher.workers())
    # The catalogue walks the models directory (sizes, configs): off the event loop.
    found = await asyncio.to_thread(catalogue.list_models, services.settings.runtime)
    listings = [listing.model_dump(mode="json") for listing in found]
    known = {listing["reference"] for listing in listings}
    # A worker may serve a model this host has never seen (another host's models directory).
    listings += [{"reference": ref, "origin": "served"} for ref in sorted(served) if ref not in known]
    for listing in listings:
        serving = served.get(listing["reference"])
        listing["serving"] = serving.model_dump() if serving else None
    return {"object": "list", "data": listings}


async def model_info(services: Services, reference: str) -> dict[str, Any]:
    served = model_serving(await services.dispatcher.workers())
    info = await asyncio.to_thread(catalogue.model_info, reference, services.settings.runtime)
    if info.get("plan") is None and info.get("description") is None and reference not in served:
        raise ModelNotFoundError(f"unknown model {reference!r}: {info.get('plan_error') or 'not found'}")
    serving = served.get(reference)
    info["serving"] = serving.model_dump() if serving else None
    return info


async def plan(services: Services, body: PlanRequest) -> dict[str, Any]:
    # Imported on first use: planning resolves devices with torch, which the server otherwise
    # never imports.
    from ollm.plan import plan_model

    runtime = runtime_for(services.settings.runtime, body)
    worker = services.settings.worker
    reference = body.model or runtime.model_reference
    planned = await asyncio.to_thread(
        plan_model, reference, runtime, body.context_tokens, worker.max_tokens_per_step, worker.max_batch
    )
    # How far the loads of this model are, where workers are loading it now.
    try:
        serving = model_serving(await services.dispatcher.workers()).get(reference)
    except redis.RedisError:
        serving = None  # planning needs no Redis: the plan stands without the loads
    loading = [load.model_dump(mode="json") for load in serving.loading] if serving else []
    return {**planned.model_dump(mode="json"), "loading": loading}


async def run_prompt(
    services: Services, http: Request, request: GenerationRequest, stream: bool, session: Session | None = None
) -> Response:
    """One prompt, answered whole or as SSE; a session gets the exchange appended when it finishes."""
    session_id = session.id if session else None

    async def remember(final: FinalEvent) -> None:
        if session is not None and final.finish_reason != "cancelled":
            user = request.messages[-1] if request.messages else ChatMessage(role="user", content="")
            session.messages += [user, ChatMessage(role="assistant", content=final.text, reasoning=final.reasoning)]
            await services.sessions.save(session)

    if not stream:
        final = (await services.dispatcher.generate(request, http.is_disconnected)).final
        await remember(final)
        return JSONResponse(to_prompt_response(request, final, session_id).model_dump(mode="json"))
    job = await services.dispatcher.submit(request)
    first = await first_event(job, http.is_disconnected)
    return event_stream(job, first, stream_frames(request, session_id), on_final=remember)
