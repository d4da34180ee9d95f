"""Server-sent events: framing, and the relay from a job stream to an HTTP streaming response.

Every streaming route waits for the job's first event before answering, so an error that happens
at once (unknown model on the worker, prompt too long) still gets its proper HTTP status; after
that, errors become the last event of the stream. The relay cancels the job whenever the stream
ends early, which is how a client disconnect reaches the worker.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from typing import Any

import anyio
from fastapi.responses import StreamingResponse

from ollm.generation import ErrorEvent, Event, FinalEvent
from server.dispatch import Disconnected, JobStream
from server.errors import error_from_event, event_from_error

Frames = Callable[[Event], Iterable[str]]
OnFinal = Callable[[FinalEvent], Awaitable[None]]
DONE = "data: [DONE]\n\n"


def sse(data: Any, event: str | None = None) -> str:
    payload = data if isinstance(data, str) else json.dumps(data, separators=(",", ":"))
    head = f"event: {event}\n" if event else ""
    return f"{head}data: {payload}\n\n"


async def first_event(stream: JobStream, disconnected: Disconnected | None = None) -> Event:
    """The job's first event; an immediate error is raised so the route answers with its status.

    Pass ``http.is_disconnected``: until the response starts, only polling notices a client that
    gave up while its job was still queued.
    """
    try:
        event = await stream.next_event(disconnected)
    except BaseException:
        await stream.close()
        raise
    if isinstance(event, ErrorEvent):
        await stream.close()
        raise error_from_event(event)
    return event


def event_stream(
    stream: JobStream, first: Event, frames: Frames, *, head: Iterable[str] = (), tail: Iterable[str] = (),
    on_final: OnFinal | None = None, media_type: str = "text/event-stream",
) -> StreamingResponse:  # fmt: skip
    """A streaming response (SSE unless ``media_type`` says otherwise): ``head``, the frames of
    every event, then ``tail``."""
    return streaming_response(_relay(stream, first, frames, list(head), list(tail), on_final), media_type)


def streaming_response(chunks: AsyncIterator[str], media_type: str = "text/event-stream") -> StreamingResponse:
    # Proxies must pass tokens through as they come, not buffer the stream.
    return StreamingResponse(
        chunks, media_type=media_type, headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
    )


async def _relay(
    stream: JobStream, first: Event, frames: Frames, head: list[str], tail: list[str], on_final: OnFinal | None
) -> AsyncIterator[str]:
    try:
        # One chunk per event (the head goes with the first): each chunk is a write and a read.
        pending = "".join(head)
        event: Event = first
        while True:
            if isinstance(event, FinalEvent) and on_final is not None:
                try:
                    await on_final(event)
                except Exception as exc:  # e.g. the session could not be saved: say so, last.
                    event = event_from_error(exc)
            pending += "".join(frames(event))
            if isinstance(event, FinalEvent | ErrorEvent):
                break
            if pending:
                yield pending
                pending = ""
            try:
                event = await stream.next_event()
            except Exception as exc:  # Redis gone, timeout: the stream still ends with a real event.
                event = event_from_error(exc)
        yield pending + "".join(tail)
    finally:
        # A disconnect cancels this generator inside a cancelled scope; shield the clean-up so
        # the cancel actually reaches Redis.
        with anyio.CancelScope(shield=True):
            await stream.close()
