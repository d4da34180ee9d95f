"""One SSE stream over several jobs: ``n`` streamed choices, or a streamed list of prompts.

OpenAI streams every choice of a request in one response, each chunk naming its choice ``index``.
Each choice is its own job here (so the worker batches them); this relay reads all their event
streams at once and hands each event to the frames of its choice, in arrival order. Like
``server.sse``, it waits for every job's first event before answering, so an immediate error gets
its HTTP status; the first error after that ends the whole stream, and every job still running is
cancelled when the stream ends for any reason (a client disconnect included).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Iterable, Sequence

import anyio
from fastapi.responses import StreamingResponse

from ollm.generation import ErrorEvent, Event, FinalEvent, GenerationRequest
from server.dispatch import Disconnected, Dispatcher, JobStream
from server.errors import event_from_error
from server.sse import first_event, streaming_response

IndexedFrames = Callable[[int, Event], Iterable[str]]
# Called with the final event of each choice by index (fewer than all when one failed).
Tail = Callable[[dict[int, FinalEvent]], Iterable[str]]


async def open_streams(
    dispatcher: Dispatcher, requests: Sequence[GenerationRequest], disconnected: Disconnected | None = None
) -> tuple[list[JobStream], list[Event]]:
    """Submit every request and wait for each first event; if any fails at once, every job
    submitted so far is closed (so cancelled) and the error raised."""
    streams: list[JobStream] = []
    firsts: list[Event] = []
    try:
        for request in requests:
            streams.append(await dispatcher.submit(request))
        for stream in streams:
            firsts.append(await first_event(stream, disconnected))
    except BaseException:
        with anyio.CancelScope(shield=True):
            for stream in streams:
                await stream.close()
        raise
    return streams, firsts


def fan_in_stream(
    streams: Sequence[JobStream], firsts: Sequence[Event], frames: IndexedFrames, *, head: Iterable[str] = (),
    tail: Tail,
) -> StreamingResponse:  # fmt: skip
    """``head``, the frames of every job's events, then ``tail(finals)`` once all have finished or
    one failed (its error's frames came just before)."""
    return streaming_response(_relay(list(streams), list(firsts), frames, list(head), tail))


async def _read(index: int, stream: JobStream, first: Event, out: asyncio.Queue[tuple[int, Event]]) -> None:
    event = first
    while True:
        await out.put((index, event))
        if isinstance(event, FinalEvent | ErrorEvent):
            return
        try:
            event = await stream.next_event()
        except Exception as exc:  # Redis gone, timeout: the stream still ends with a real event.
            event = event_from_error(exc)


async def _relay(
    streams: list[JobStream], firsts: list[Event], frames: IndexedFrames, head: list[str], tail: Tail
) -> AsyncIterator[str]:
    queue: asyncio.Queue[tuple[int, Event]] = asyncio.Queue()
    readers = [asyncio.create_task(_read(i, s, f, queue)) for i, (s, f) in enumerate(zip(streams, firsts, strict=True))]
    finals: dict[int, FinalEvent] = {}
    try:
        for frame in head:
            yield frame
        while len(finals) < len(streams):
            index, event = await queue.get()
            for frame in frames(index, event):
                yield frame
            if isinstance(event, ErrorEvent):
                break
            if isinstance(event, FinalEvent):
                finals[index] = event
        for frame in tail(finals):
            yield frame
    finally:
        for reader in readers:
            reader.cancel()
        # Shielded like server.sse: a disconnect must still cancel the jobs in Redis.
        with anyio.CancelScope(shield=True):
            await asyncio.gather(*readers, return_exceptions=True)
            for stream in streams:
                await stream.close()
