"""The job functions RQ runs: one generation or one embedding request, on an engine already loaded.

The server enqueues ``workers.job.generate`` / ``workers.job.embed`` with the request as JSON. The
worker process installs one ``JobContext`` (its engines and a Redis connection) at start-up; each
job submits to the engine, relays the engine's events onto the job's pub/sub channel and returns
the final event, which RQ keeps as the job's result. A failed generation raises, so the job lands
in RQ's failed registry.
"""

from __future__ import annotations

import json
import logging
import queue
import threading
from collections.abc import Mapping
from typing import Any, Protocol

import redis

from ollm.engine.base import Engine
from ollm.errors import GenerationFailedError, ModelNotFoundError, OllmError
from ollm.generation import (
    EmbeddingRequest,
    EmbeddingResult,
    ErrorEvent,
    Event,
    FinalEvent,
    GenerationRequest,
    Timings,
    Usage,
)
from workers.keys import Keys

log = logging.getLogger(__name__)

# How often a job thread wakes while waiting for engine events; RQ's timer-based job timeout can
# only interrupt the thread between waits.
_POLL_SECONDS = 0.25


class Embedder(Protocol):
    def embed(self, request: EmbeddingRequest) -> EmbeddingResult: ...


class JobContext:
    """What a job needs from its worker process: engines by model reference, Redis, key names."""

    def __init__(
        self,
        connection: redis.Redis,
        keys: Keys,
        engines: Mapping[str, Engine],
        embedders: Mapping[str, Embedder] | None = None,
    ) -> None:
        self.connection = connection
        self.keys = keys
        self.engines = dict(engines)
        self.embedders = dict(embedders or {})
        self._in_flight: dict[str, Engine] = {}
        self._lock = threading.Lock()

    def in_flight(self) -> int:
        with self._lock:
            return len(self._in_flight)

    def cancel(self, request_id: str) -> None:
        with self._lock:
            engine = self._in_flight.get(request_id)
        if engine is not None:
            engine.cancel(request_id)

    def cancel_all(self) -> None:
        with self._lock:
            running = list(self._in_flight.items())
        for request_id, engine in running:
            engine.cancel(request_id)

    def generate(self, request: GenerationRequest) -> FinalEvent:
        channel = self.keys.events(request.id)
        engine = self.engines.get(request.model)
        if engine is None:
            error = ModelNotFoundError(f"this worker does not serve model {request.model!r}")
            self._publish(channel, [_error_event(error)])
            raise error
        events: queue.Queue[Event] = queue.Queue()
        with self._lock:
            self._in_flight[request.id] = engine
        try:
            # The server sets this marker before publishing a cancel, so a cancel that came while
            # the job was still queued is not missed (the listener only sees later messages).
            if self.connection.exists(self.keys.cancelled(request.id)):
                final = FinalEvent(finish_reason="cancelled", text="", usage=Usage(), timings=Timings())
                self._publish(channel, [final])
                return final
            engine.submit(request, events.put)
            return self._relay(request, engine, events, channel)
        except BaseException as exc:
            engine.cancel(request.id)
            if not isinstance(exc, _EngineError):
                self._publish_quietly(channel, _error_event(exc))
            raise
        finally:
            with self._lock:
                self._in_flight.pop(request.id, None)

    def embed(self, request: EmbeddingRequest) -> EmbeddingResult:
        channel = self.keys.events(_current_job_id())
        embedder = self.embedders.get(request.model)
        try:
            if embedder is None:
                raise ModelNotFoundError(f"this worker does not serve embedding model {request.model!r}")
            result = embedder.embed(request)
        except BaseException as exc:
            self._publish_quietly(channel, _error_event(exc))
            raise
        self.connection.publish(channel, json.dumps({"type": "embedding", **result.model_dump(mode="json")}))
        return result

    def _relay(
        self, request: GenerationRequest, engine: Engine, events: queue.Queue[Event], channel: str
    ) -> FinalEvent:
        while True:
            try:
                batch = [events.get(timeout=_POLL_SECONDS)]
            except queue.Empty:
                continue
            # Everything the engine produced meanwhile goes out in one round trip.
            while True:
                try:
                    batch.append(events.get_nowait())
                except queue.Empty:
                    break
            self._publish(channel, batch)
            last = batch[-1]
            if isinstance(last, FinalEvent):
                return last
            if isinstance(last, ErrorEvent):
                raise _EngineError(last)

    def _publish(self, channel: str, events: list[Any]) -> None:
        with self.connection.pipeline(transaction=False) as pipe:
            for event in events:
                pipe.publish(channel, event.model_dump_json())
            pipe.execute()

    def _publish_quietly(self, channel: str, event: ErrorEvent) -> None:
        try:
            self._publish(channel, [event])
        except redis.RedisError as exc:
            log.warning("could not publish error on %s: %s", channel, exc)


class _EngineError(GenerationFailedError):
    """The engine ended a request with an ErrorEvent; it has already been published."""

    def __init__(self, event: ErrorEvent) -> None:
        super().__init__(event.message)
        self.status = event.status
        self.code = event.code


def _error_event(exc: BaseException) -> ErrorEvent:
    if isinstance(exc, OllmError):
        return ErrorEvent(message=exc.message, status=exc.status, code=exc.code)
    return ErrorEvent(message=f"generation failed: {type(exc).__name__}: {exc}", status=500)


def _current_job_id() -> str:
    from rq import get_current_job

    job = get_current_job()
    if job is None:
        raise RuntimeError("embed() must run inside an RQ job")
    return job.id


_context: JobContext | None = None


def install(context: JobContext | None) -> None:
    """Called once by the worker process after its engines are loaded (None on shutdown)."""
    global _context
    _context = context


def _require_context() -> JobContext:
    if _context is None:
        raise RuntimeError("no JobContext installed: ollm jobs must run in an `ollm worker` process")
    return _context


def generate(payload: dict[str, Any]) -> dict[str, Any]:
    """RQ job: one generation request; returns the final event."""
    request = GenerationRequest.model_validate(payload)
    return _require_context().generate(request).model_dump(mode="json")


def embed(payload: dict[str, Any]) -> dict[str, Any]:
    """RQ job: one embedding request; returns the EmbeddingResult."""
    request = EmbeddingRequest.model_validate(payload)
    return _require_context().embed(request).model_dump(mode="json")
