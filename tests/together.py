"""Requests submitted to one batching engine at once: their events, and the largest batch seen."""

from __future__ import annotations

import threading

from ollm.engine.batching import BatchingEngine
from ollm.generation import ErrorEvent, Event, FinalEvent, GenerationRequest


def submit_together(engine: BatchingEngine, requests: list[GenerationRequest]) -> tuple[list[list[Event]], int]:
    """Every request's events (each request gets a fresh id) and the largest decode batch seen."""
    events: list[list[Event]] = [[] for _ in requests]
    ended = [threading.Event() for _ in requests]

    def sink(index: int) -> object:
        def put(event: Event) -> None:
            events[index].append(event)
            if isinstance(event, FinalEvent | ErrorEvent):
                ended[index].set()

        return put

    for index, request in enumerate(requests):
        engine.submit(request.model_copy(update={"id": f"{request.id}-together"}), sink(index))  # type: ignore[arg-type]
    largest = 0
    while not all(end.wait(0.005) for end in ended):
        largest = max(largest, engine.batch_size())
    return events, largest
