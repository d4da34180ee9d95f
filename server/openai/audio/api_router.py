"""HTTP wiring of /v1/audio/transcriptions and /v1/audio/translations; the work is in serving.py."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, File, Form, Request, UploadFile
from fastapi.responses import Response
from openai.types.audio import Transcription, TranscriptionVerbose

from server.errors import ERROR_RESPONSES
from server.openai.audio import serving
from server.openai.audio.serving import AudioForm, ResponseFormat
from server.routing import ClientInputRoute
from server.services import Services, services

router = APIRouter(prefix="/v1", tags=["openai"], route_class=ClientInputRoute, responses=ERROR_RESPONSES)

_RESPONSES: dict[int | str, dict[str, object]] = {
    200: {
        "content": {
            "application/json": {},
            "text/plain": {},
            "text/vtt": {},
            "application/x-subrip": {},
            "text/event-stream": {},
        }
    }
}


@router.post(
    "/audio/transcriptions",
    response_model=Transcription | TranscriptionVerbose,
    responses=_RESPONSES,
    summary="Speech to text (multipart: `file`, `model`, `language`, `prompt`, `temperature`, `response_format` "
    "json|text|verbose_json|srt|vtt, `stream`); long audio is cut into windows and joined",
)
async def create_transcription(
    http: Request,
    file: Annotated[UploadFile, File(description="Audio: wav, flac, mp3 or ogg")],
    model: Annotated[str, Form()],
    language: Annotated[str | None, Form(min_length=2, max_length=2, description="ISO-639-1 code")] = None,
    prompt: Annotated[
        str | None, Form(description="Accepted for compatibility; Voxtral's transcription format has no place for it")
    ] = None,
    response_format: Annotated[ResponseFormat, Form()] = "json",
    temperature: Annotated[float, Form(ge=0.0, le=1.0)] = 0.0,
    stream: Annotated[bool, Form()] = False,
    timestamp_granularities: Annotated[list[str] | None, Form(alias="timestamp_granularities[]")] = None,
    svc: Services = Depends(services),
) -> Response:
    form = AudioForm(model, language, prompt, response_format, temperature, stream, timestamp_granularities or [])
    return await serving.create(svc, http, file, form, "transcribe")


@router.post(
    "/audio/translations",
    response_model=Transcription | TranscriptionVerbose,
    responses=_RESPONSES,
    summary="Speech to English text (multipart: `file`, `model`, `prompt`, `temperature`, `response_format`)",
)
async def create_translation(
    http: Request,
    file: Annotated[UploadFile, File(description="Audio: wav, flac, mp3 or ogg")],
    model: Annotated[str, Form()],
    prompt: Annotated[str | None, Form()] = None,
    response_format: Annotated[ResponseFormat, Form()] = "json",
    temperature: Annotated[float, Form(ge=0.0, le=1.0)] = 0.0,
    svc: Services = Depends(services),
) -> Response:
    form = AudioForm(model, None, prompt, response_format, temperature, False, [])
    return await serving.create(svc, http, file, form, "translate")
