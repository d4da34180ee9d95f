"""The engine interface: many requests in flight at once, events delivered through a sink."""

from __future__ import annotations

import logging
import queue
from collections.abc import Callable, Iterator
from typing import Protocol, TypeVar

from ollm.errors import InvalidRequestError, OllmError
from ollm.generation import ErrorEvent, Event, ExecutionInfo, FinalEvent, GenerationRequest

log = logging.getLogger(__name__)

EventSink = Callable[[Event], None]
T = TypeVar("T")


class Engine(Protocol):
    """A loaded model that generates for many requests concurrently.

    ``submit`` returns at once when ``ready()``; the engine calls ``sink`` from its own thread with
    TokenEvents and then exactly one FinalEvent or ErrorEvent. ``cancel`` ends a request within a
    few tokens with finish reason ``cancelled``.
    """

    info: ExecutionInfo

    def submit(self, request: GenerationRequest, sink: EventSink) -> None: ...

    def cancel(self, request_id: str) -> None: ...

    def active(self) -> int: ...

    def ready(self) -> bool:
        """False while ``submit`` would block first (a model to load again after its keep-alive)."""
        ...

    def close(self) -> None: ...


def stream(engine: Engine, request: GenerationRequest) -> Iterator[Event]:
    """Submit one request and yield its events in order, ending with the final or error event."""
    events: queue.Queue[Event] = queue.Queue()
    engine.submit(request, events.put)
    event: Event | None = None
    try:
        while True:
            event = events.get()
            yield event
            if isinstance(event, FinalEvent | ErrorEvent):
                return
    finally:
        # The consumer stopped early (Ctrl-C, closed connection): free the sequence's slot.
        if not isinstance(event, FinalEvent | ErrorEvent):
            engine.cancel(request.id)


def prepared(build: Callable[[], T], sink: EventSink) -> T | None:
    """What ``build`` makes of a request, or None once its failure went to the sink as an error.

    Runs on an engine's own thread: any exception escaping here would end it for every request.
    """
    try:
        return build()
    except OllmError as exc:
        sink(ErrorEvent.from_error(exc))
    except Exception as exc:  # a tokenizer's or processor's ValueError...
        log.exception("preparing the request failed")
        sink(ErrorEvent(message=f"the request could not be prepared: {exc}", status=500))
    return None


def refuse_audio(model: str, request: GenerationRequest) -> None:
    """The 400 of every engine whose model has no audio capability, for a request that carries audio."""
    if request.messages and any(m.audios() for m in request.messages):
        raise InvalidRequestError(
            f"model {model} does not accept audio (it has no audio capability); send text only "
            "or use an audio model such as voxtral",
            param="file" if request.transcription else "messages",
        )
