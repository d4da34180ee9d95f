"""The FastAPI app: routers of every API family, errors, limits, auth and offline docs.

The app never loads a model: generation goes through ``server.dispatch`` to `ollm worker`s.
Adding an API family: write ``server/<family>/{protocol,serving,api_router}.py`` with pure
translators in serving.py over ``ollm.generation`` and the shared ``Services.dispatcher``, then
include its router in ``ROUTERS`` below.
"""

from __future__ import annotations

import json
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import APIRouter, FastAPI

from ollm.settings import Settings, load_settings
from server.anthropic.api_router import router as anthropic_router
from server.docs import install_docs
from server.errors import install_error_handlers
from server.metrics.api_router import router as metrics_router
from server.metrics.requests import RequestMetrics, endpoints
from server.middleware import ApiKeyAuth, BodyLimit
from server.native.api_router import router as native_router
from server.ollama.api_router import router as ollama_router
from server.openai.audio.api_router import router as audio_router
from server.openai.batches.api_router import router as batches_router
from server.openai.batches.runner import BatchRunner
from server.openai.chat_completion.api_router import router as chat_completion_router
from server.openai.completion.api_router import router as completion_router
from server.openai.embeddings.api_router import router as embeddings_router
from server.openai.files.api_router import router as files_router
from server.openai.models.api_router import router as models_router
from server.openai.responses.api_router import router as responses_router
from server.services import Services

ROUTERS: list[APIRouter] = [
    native_router,
    chat_completion_router,
    completion_router,
    embeddings_router,
    models_router,
    responses_router,
    files_router,
    audio_router,
    batches_router,
    anthropic_router,
    ollama_router,
    metrics_router,
]

# `ollm serve --reload` and uvicorn's worker processes import the app by name, so the resolved
# settings (flags included) travel to them as JSON in this variable.
SETTINGS_ENV = "OLLM_SERVE_SETTINGS"


def create_app(settings: Settings, services: Services | None = None) -> FastAPI:
    """``services`` is for tests that bring their own Redis clients (fakeredis)."""
    services = services or Services.build(settings)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        # Batches run on the server: this one resumes any batch no other server is driving.
        runner = BatchRunner(
            app, services.connection, services.keys, services.batches, services.files,
            concurrency=settings.server.batch_concurrency, lease_seconds=settings.server.batch_lease_seconds,
            max_line_bytes=settings.server.max_request_bytes, api_key=settings.server.api_key,
        )  # fmt: skip
        app.state.batch_runner = runner
        runner.start()
        try:
            yield
        finally:
            await runner.stop()
            await services.close()

    app = FastAPI(
        title="ollm",
        summary="Run Hugging Face Transformers models locally and serve them.",
        version="0.1.0",
        docs_url=None,
        redoc_url=None,
        lifespan=lifespan,
    )
    app.state.services = services
    install_error_handlers(app)
    install_docs(app)
    for router in ROUTERS:
        app.include_router(router)
    # Added last = outermost: a too-large or unauthenticated request is refused before parsing.
    if settings.server.api_key:
        app.add_middleware(ApiKeyAuth, api_key=settings.server.api_key)
    # Uploads for the Batch API are bounded by their own setting (multipart framing aside).
    uploads = {"/v1/files": (settings.server.max_file_bytes + 64 * 1024, "server.max_file_bytes")}
    app.add_middleware(BodyLimit, max_bytes=settings.server.max_request_bytes, larger=uploads)
    # Outermost: requests refused by the limit or the key are counted too.
    app.add_middleware(RequestMetrics, metrics=services.dispatcher.metrics, routes=endpoints(app, ROUTERS))
    return app


def app_from_environment() -> FastAPI:
    """Factory for uvicorn (``server.app:app_from_environment``)."""
    raw = os.environ.get(SETTINGS_ENV)
    settings = Settings.model_validate(json.loads(raw)) if raw else load_settings()
    return create_app(settings)
