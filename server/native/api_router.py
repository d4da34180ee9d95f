"""HTTP wiring of the native routes; the work is in serving.py."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, Response

from ollm.errors import OllmError
from server.errors import ERROR_RESPONSES
from server.native import serving
from server.native.protocol import (
    HealthResponse,
    PlanRequest,
    PromptRequest,
    PromptResponse,
    SessionCreateRequest,
    SessionPromptRequest,
    SessionResponse,
)
from server.routing import ClientInputRoute
from server.services import Services, services
from server.stores.sessions import Session

router = APIRouter(prefix="/v1", tags=["ollm"], route_class=ClientInputRoute, responses=ERROR_RESPONSES)


class SessionNotFoundError(OllmError):
    status = 404
    code = "session_not_found"
    kind = "invalid_request_error"


@router.get("/health", response_model=HealthResponse, summary="Redis status and live workers per model")
async def health(svc: Services = Depends(services)) -> JSONResponse:
    return await serving.health(svc)


@router.get("/ollm/models", summary="Known models (built-in and local) and which are being served")
async def list_models(svc: Services = Depends(services)) -> dict[str, Any]:
    return await serving.list_models(svc)


@router.get("/ollm/models/{model_reference:path}", summary="One model: catalogue facts, runtime plan, serving")
async def model_info(model_reference: str, svc: Services = Depends(services)) -> dict[str, Any]:
    return await serving.model_info(svc, model_reference)


@router.post("/plan", summary="How a model would run here (backend, device, dtype), without loading it")
async def plan(body: PlanRequest, svc: Services = Depends(services)) -> dict[str, Any]:
    return await serving.plan(svc, body)


def _prompt_request(svc: Services, body: PromptRequest) -> Any:
    model = body.model or svc.settings.runtime.model_reference
    messages = serving.prompt_messages(body.prompt, body.system, body.audio)
    return serving.to_generation_request(model, messages, body, svc.settings.generation)


@router.post("/prompt", response_model=PromptResponse, summary="One-shot prompt, answered whole")
async def prompt(body: PromptRequest, http: Request, svc: Services = Depends(services)) -> Response:
    return await serving.run_prompt(svc, http, _prompt_request(svc, body), stream=False)


@router.post("/prompt/stream", summary="One-shot prompt as SSE: `token` events, then `final` or `error`")
async def prompt_stream(body: PromptRequest, http: Request, svc: Services = Depends(services)) -> Response:
    return await serving.run_prompt(svc, http, _prompt_request(svc, body), stream=True)


@router.post("/sessions", response_model=SessionResponse, summary="Start a chat session")
async def create_session(body: SessionCreateRequest, svc: Services = Depends(services)) -> Session:
    return await svc.sessions.create(body.model or svc.settings.runtime.model_reference, body.system)


async def _session(svc: Services, session_id: str) -> Session:
    session = await svc.sessions.get(session_id)
    if session is None:
        raise SessionNotFoundError(f"no session {session_id!r} (it may have expired)", param="session_id")
    return session


@router.get("/sessions/{session_id}", response_model=SessionResponse, summary="A session and its messages")
async def get_session(session_id: str, svc: Services = Depends(services)) -> Session:
    return await _session(svc, session_id)


async def _session_prompt(
    svc: Services, http: Request, session_id: str, body: SessionPromptRequest, stream: bool
) -> Response:
    session = await _session(svc, session_id)
    request = serving.to_generation_request(
        session.model, session.conversation(body.prompt), body, svc.settings.generation
    )
    return await serving.run_prompt(svc, http, request, stream=stream, session=session)


@router.post("/sessions/{session_id}/prompt", response_model=PromptResponse, summary="Next turn of a session")
async def session_prompt(
    session_id: str, body: SessionPromptRequest, http: Request, svc: Services = Depends(services)
) -> Response:
    return await _session_prompt(svc, http, session_id, body, stream=False)


@router.post("/sessions/{session_id}/prompt/stream", summary="Next turn of a session, as SSE")
async def session_prompt_stream(
    session_id: str, body: SessionPromptRequest, http: Request, svc: Services = Depends(services)
) -> Response:
    return await _session_prompt(svc, http, session_id, body, stream=True)
