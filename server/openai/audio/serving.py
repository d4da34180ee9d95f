"""/v1/audio/transcriptions and /v1/audio/translations: audio in, text out, in OpenAI's five formats.

The upload is decoded once here (ollm.audio: a garbage file or one over the [audio] limits is a 400
before anything is queued) and cut into windows of ``audio.window_seconds``; each window is one
ordinary generation job (same queue, workers and metrics as every other request), and their texts
are joined. A transcription uses the model's own transcription format (Voxtral: ``lang:xx
[TRANSCRIBE]``); a translation is a chat turn asking for English, which is how Voxtral translates.
"""

from __future__ import annotations

import base64
import statistics
import zlib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Literal

import anyio
from fastapi import Request, UploadFile
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from openai.types.audio import Transcription, TranscriptionSegment, TranscriptionVerbose
from openai.types.audio.transcription import UsageTokens
from openai.types.audio.transcription_verbose import Usage as DurationUsage

from ollm.audio import Clip, decode_audio
from ollm.errors import InvalidRequestError
from ollm.generation import (
    ChatMessage,
    ContentPart,
    ErrorEvent,
    FinalEvent,
    GenerationRequest,
    TokenEvent,
)
from ollm.generation import (
    Transcription as TranscriptionTask,
)
from ollm.sampling_defaults import sampling_params
from ollm.settings import Settings
from server.dispatch import Completed
from server.errors import error_body, event_from_error
from server.openai.runs import generate_all
from server.services import Services
from server.sse import first_event, sse, streaming_response

Task = Literal["transcribe", "translate"]
ResponseFormat = Literal["json", "text", "verbose_json", "srt", "vtt"]
# What Voxtral is asked when translating (OpenAI's translations always answer in English).
TRANSLATE_INSTRUCTION = "Translate this audio into English. Answer with the translation only."


@dataclass
class AudioForm:
    model: str
    language: str | None
    prompt: str | None
    response_format: ResponseFormat
    temperature: float
    stream: bool
    timestamp_granularities: list[str]


@dataclass
class _Window:
    start: float
    end: float
    request: GenerationRequest


async def _read_upload(upload: UploadFile, limit: int) -> bytes:
    raw = await upload.read(limit + 1)
    if len(raw) > limit:
        raise InvalidRequestError(
            f"the audio file is larger than the limit of {limit} bytes (audio.max_bytes); send a shorter or "
            "more compressed file",
            param="file",
        )
    return raw


def windows(clip: Clip, form: AudioForm, task: Task, settings: Settings) -> list[_Window]:
    """One generation request per window of the clip (pure)."""
    sampling = sampling_params(settings.generation, temperature=form.temperature, logprobs=True)
    out = []
    for start, piece in clip.windows(settings.audio.window_seconds):
        audio = ContentPart(type="audio", audio=base64.b64encode(piece.flac()).decode())
        if task == "transcribe":
            message = ChatMessage(role="user", content=[audio])
            transcription = TranscriptionTask(language=form.language)
        else:
            message = ChatMessage(role="user", content=[audio, ContentPart(type="text", text=TRANSLATE_INSTRUCTION)])
            transcription = None
        request = GenerationRequest(
            model=form.model, messages=[message], sampling=sampling, transcription=transcription
        )
        out.append(_Window(start, start + piece.seconds, request))
    return out


def _check_form(form: AudioForm) -> None:
    if form.stream and form.response_format not in ("json", "text"):
        raise InvalidRequestError(
            f"stream=true sends transcript.text events; response_format {form.response_format!r} cannot stream. "
            "Use json or text, or stream=false",
            param="response_format",
        )
    words = [g for g in form.timestamp_granularities if g != "segment"]
    if words:
        raise InvalidRequestError(
            f"timestamp_granularities {words} are not available: ollm times segments (one per audio window) only",
            param="timestamp_granularities[]",
        )


async def create(services: Services, http: Request, upload: UploadFile, form: AudioForm, task: Task) -> Response:
    _check_form(form)
    settings = services.settings
    raw = await _read_upload(upload, settings.audio.max_bytes)
    clip = await anyio.to_thread.run_sync(decode_audio, raw, settings.audio, "file")
    pieces = windows(clip, form, task, settings)
    if form.stream:
        return await _stream(services, http, pieces)
    done = await generate_all(services.dispatcher, [p.request for p in pieces], http.is_disconnected)
    return _respond(form, task, clip, pieces, done)


def _text(done: list[Completed]) -> str:
    return " ".join(t for t in (c.final.text.strip() for c in done) if t)


def _timestamp(seconds: float, separator: str) -> str:
    millis = round(seconds * 1000)
    hours, millis = divmod(millis, 3_600_000)
    minutes, millis = divmod(millis, 60_000)
    secs, millis = divmod(millis, 1000)
    return f"{hours:02d}:{minutes:02d}:{secs:02d}{separator}{millis:03d}"


def _segments(pieces: list[_Window], done: list[Completed]) -> list[TranscriptionSegment]:
    segments = []
    for index, (piece, completed) in enumerate(zip(pieces, done, strict=True)):
        text = completed.final.text.strip()
        data = text.encode()
        segments.append(
            TranscriptionSegment(
                id=index,
                seek=round(piece.start * 100),  # Whisper's unit: 10 ms mel frames
                start=piece.start,
                end=piece.end,
                text=text,
                tokens=[lp.token_id for lp in completed.logprobs],
                temperature=piece.request.sampling.temperature,
                avg_logprob=statistics.fmean(lp.logprob for lp in completed.logprobs) if completed.logprobs else 0.0,
                compression_ratio=len(data) / len(zlib.compress(data)) if data else 0.0,
                # Not estimated: Voxtral has no no-speech head.
                no_speech_prob=0.0,
            )
        )
    return segments


def _captions(segments: list[TranscriptionSegment], vtt: bool) -> str:
    if vtt:
        cues = [f"{_timestamp(s.start, '.')} --> {_timestamp(s.end, '.')}\n{s.text}\n" for s in segments if s.text]
        return "WEBVTT\n\n" + "\n".join(cues)
    cues = [
        f"{n}\n{_timestamp(s.start, ',')} --> {_timestamp(s.end, ',')}\n{s.text}\n"
        for n, s in enumerate((s for s in segments if s.text), start=1)
    ]
    return "\n".join(cues)


def _usage(done: list[Completed]) -> UsageTokens:
    prompt = sum(c.final.usage.prompt_tokens for c in done)
    output = sum(c.final.usage.completion_tokens for c in done)
    return UsageTokens(type="tokens", input_tokens=prompt, output_tokens=output, total_tokens=prompt + output)


def _respond(form: AudioForm, task: Task, clip: Clip, pieces: list[_Window], done: list[Completed]) -> Response:
    text = _text(done)
    if form.response_format == "text":
        return PlainTextResponse(text)
    if form.response_format == "json":
        body = Transcription(text=text, usage=_usage(done))
        return JSONResponse(body.model_dump(mode="json", exclude_none=True))
    segments = _segments(pieces, done)
    if form.response_format == "verbose_json":
        verbose = TranscriptionVerbose(
            duration=clip.seconds,
            # The ISO-639-1 code asked for (translations: en); "unknown" when the model detected it unsaid.
            language="en" if task == "translate" else (form.language or "unknown"),
            text=text,
            segments=segments,
            usage=DurationUsage(type="duration", seconds=clip.seconds),
        )
        return JSONResponse(verbose.model_dump(mode="json", exclude_none=True))
    vtt = form.response_format == "vtt"
    return PlainTextResponse(_captions(segments, vtt), media_type="text/vtt" if vtt else "application/x-subrip")


async def _stream(services: Services, http: Request, pieces: list[_Window]) -> Response:
    """``transcript.text.delta`` per token, window after window, then one ``transcript.text.done``."""
    job = await services.dispatcher.submit(pieces[0].request)
    first = await first_event(job, http.is_disconnected)

    async def events() -> AsyncIterator[str]:
        texts: list[str] = []
        prompt = output = 0
        stream, event = job, first
        try:
            for index in range(len(pieces)):
                if index:
                    stream = await services.dispatcher.submit(pieces[index].request)
                    event = await stream.next_event()
                parts: list[str] = []
                while True:
                    if isinstance(event, ErrorEvent):
                        yield sse(error_body(event.status, event.message, code=event.code))
                        return
                    if isinstance(event, FinalEvent):
                        prompt += event.usage.prompt_tokens
                        output += event.usage.completion_tokens
                        break
                    assert isinstance(event, TokenEvent)
                    # Windows are joined by one space; the first token of a window carries it.
                    delta = event.text.lstrip() if not parts else event.text
                    if delta and texts and not parts:
                        delta = " " + delta
                    if delta:
                        parts.append(delta)
                        yield sse({"type": "transcript.text.delta", "delta": delta})
                    event = await stream.next_event()
                await stream.close()
                texts.append("".join(parts))
            usage = {"type": "tokens", "input_tokens": prompt, "output_tokens": output, "total_tokens": prompt + output}
            text = " ".join(t for t in (t.strip() for t in texts) if t)
            yield sse({"type": "transcript.text.done", "text": text, "usage": usage})
        except Exception as exc:  # Redis gone, timeout: the stream still ends with a real event.
            error = event_from_error(exc)
            yield sse(error_body(error.status, error.message, code=error.code))
        finally:
            with anyio.CancelScope(shield=True):
                await stream.close()

    return streaming_response(events())
