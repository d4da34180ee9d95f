"""The engine interface: many requests in flight at once, events delivered through a sink."""

from __future__ import annotations

import queue
from collections.abc import Callable, Iterator
from typing import Protocol

from ollm.generation import ErrorEvent, Event, ExecutionInfo, FinalEvent, GenerationRequest

EventSink = Callable[[Event], None]


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
