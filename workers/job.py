"""The job functions RQ runs: one generation or one embedding request, on an engine already loaded.

The server enqueues ``workers.job.generate`` / ``workers.job.embed`` with the request as JSON. The
worker process installs one ``JobContext`` (its engines and a Redis connection) at start-up. A
generation is submitted to its engine as soon as the worker has dequeued the job (``prestart``),
so the first token overlaps RQ's bookkeeping; the job function then takes the run over, waits for
it and returns the final event, which RQ keeps as the job's result. Events reach the job's pub/sub
channel through one ``Publisher`` thread per process. A failed generation raises, so the job lands
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
from rq.exceptions import DeserializationError
from rq.job import Job

from ollm.contract import EMBED_JOB, GENERATE_JOB, LOAD_JOB, Keys, LoadRequest
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

log = logging.getLogger(__name__)

# How often a job thread wakes while waiting for its run; RQ's timer-based job timeout can only
# interrupt the thread between waits.
_POLL_SECONDS = 0.25


class Embedder(Protocol):
    def embed(self, request: EmbeddingRequest) -> EmbeddingResult: ...


class Loader(Protocol):
    """Loads a model on demand (the worker's residency); see ``workers.job.load``."""

    def __call__(self, request: LoadRequest) -> dict[str, Any]: ...


class _Run:
    """One generation on an engine: done once its final or error event has been published."""

    def __init__(self, request_id: str, engine: Engine, channel: str) -> None:
        self.id = request_id
        self.engine = engine
        self.channel = channel
        self.last: FinalEvent | ErrorEvent | None = None
        self.failure: BaseException | None = None
        self.done = threading.Event()

    def wait(self) -> FinalEvent:
        while not self.done.wait(_POLL_SECONDS):
            pass
        if self.failure is not None:
            raise self.failure
        if isinstance(self.last, ErrorEvent):
            raise _EngineError(self.last)
        assert self.last is not None
        return self.last


class Publisher:
    """One thread publishes the events of every generation in the process.

    Whatever the engines produced since the last round trip goes out in one pipeline, so a decode
    step of a full batch costs one round trip, not one per sequence. A run is done only after its
    last event is out: the server may rely on having seen it before the job's status changes.
    """

    def __init__(self, connection: redis.Redis) -> None:
        self.connection = connection
        self._queue: queue.SimpleQueue[tuple[_Run, Event] | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="ollm-publisher", daemon=True)
        self._thread.start()

    def put(self, run: _Run, event: Event) -> None:
        self._queue.put((run, event))

    def close(self) -> None:
        self._queue.put(None)
        self._thread.join(timeout=5)

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            batch: list[tuple[_Run, Event]] = []
            while item is not None:
                batch.append(item)
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    break
            if batch:
                self._publish(batch)
            if item is None:
                return

    def _publish(self, batch: list[tuple[_Run, Event]]) -> None:
        failure: BaseException | None = None
        try:
            with self.connection.pipeline(transaction=False) as pipe:
                for run, event in batch:
                    pipe.publish(run.channel, event.model_dump_json())
                pipe.execute()
        except Exception as exc:  # this thread must survive anything, or every run would hang
            log.warning("could not publish %d events: %s", len(batch), exc)
            failure = GenerationFailedError(f"could not publish the generation's events: {exc}")
        for run, event in batch:
            if failure is not None and not run.done.is_set():
                # Events were lost: the job fails rather than return an answer nobody saw whole.
                run.failure = failure
                run.engine.cancel(run.id)
                run.done.set()
            elif isinstance(event, FinalEvent | ErrorEvent):
                run.last = event
                run.done.set()


class JobContext:
    """What a job needs from its worker process: engines by model reference, Redis, key names."""

    def __init__(
        self,
        connection: redis.Redis,
        keys: Keys,
        engines: Mapping[str, Engine],
        embedders: Mapping[str, Embedder] | None = None,
        loader: Loader | None = None,
    ) -> None:
        self.connection = connection
        self.keys = keys
        # Live views: models loaded on demand appear in them, evicted ones leave.
        self.engines = engines
        self.embedders = embedders if embedders is not None else {}
        self.loader = loader
        self.publisher = Publisher(connection)
        self._runs: dict[str, _Run] = {}
        self._lock = threading.Lock()

    def close(self) -> None:
        self.publisher.close()

    def in_flight(self) -> int:
        with self._lock:
            return len(self._runs)

    def cancel(self, request_id: str) -> None:
        with self._lock:
            run = self._runs.get(request_id)
        if run is not None:
            run.engine.cancel(request_id)

    def cancel_all(self) -> None:
        with self._lock:
            running = list(self._runs.values())
        for run in running:
            run.engine.cancel(run.id)

    def abort_all(self, event: ErrorEvent) -> None:
        """End every running generation with ``event`` (its client sees the error, not a cut
        answer) and stop it on its engine; each job then fails with that error."""
        with self._lock:
            running = list(self._runs.values())
        for run in running:
            self.publisher.put(run, event)
            run.engine.cancel(run.id)

    def prestart(self, job: Job) -> None:
        """Start a dequeued generation job's request on its engine before RQ's own bookkeeping.

        The job function then takes over the run. Anything wrong with the request is left for it
        to report, as a job failure, and so is a model that must be loaded first: this runs on the
        thread that dequeues, which must not block.
        """
        if job.func_name != GENERATE_JOB:
            return
        try:
            request = GenerationRequest.model_validate(job.args[0])
            engine = self.engines.get(request.model)
            if request.id == job.id and engine is not None and engine.ready():
                self._start(request)
        except Exception as exc:
            log.debug("job %s not started early: %s", job.id, exc)

    def discard(self, request_id: str) -> None:
        """Cancel and forget a run: its job failed, or never ran to take it over."""
        run = self._forget(request_id)
        if run is not None:
            run.engine.cancel(request_id)

    def generate(self, request: GenerationRequest) -> FinalEvent:
        channel = self.keys.events(request.id)
        try:
            # The server sets this marker before publishing a cancel, so a cancel that came while
            # the job was still queued is not missed (the listener only sees later messages).
            cancelled = bool(self.connection.exists(self.keys.cancelled(request.id)))
            with self._lock:
                run = self._runs.get(request.id)
            if run is None:
                if cancelled:
                    final = FinalEvent(finish_reason="cancelled", text="", usage=Usage(), timings=Timings())
                    self._publish(channel, final)
                    return final
                run = self._start(request)
            elif cancelled:
                run.engine.cancel(request.id)
            return run.wait()
        except BaseException as exc:
            self.discard(request.id)
            if not isinstance(exc, _EngineError):
                self._publish_quietly(channel, _error_event(exc))
            raise
        finally:
            self._forget(request.id)

    def _start(self, request: GenerationRequest) -> _Run:
        engine = self.engines.get(request.model)
        if engine is None:
            raise ModelNotFoundError(f"this worker does not serve model {request.model!r}")
        run = _Run(request.id, engine, self.keys.events(request.id))
        with self._lock:
            self._runs[request.id] = run
        try:
            engine.submit(request, lambda event: self.publisher.put(run, event))
        except BaseException:
            self._forget(request.id)
            raise
        return run

    def _forget(self, request_id: str) -> _Run | None:
        with self._lock:
            return self._runs.pop(request_id, None)

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

    def _publish(self, channel: str, event: FinalEvent | ErrorEvent) -> None:
        self.connection.publish(channel, event.model_dump_json())

    def _publish_quietly(self, channel: str, event: ErrorEvent) -> None:
        try:
            self._publish(channel, event)
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
        return ErrorEvent.from_error(exc)
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


def load(payload: dict[str, Any]) -> dict[str, Any]:
    """RQ job, on one worker's own queue: load a model there (placed by the server's scheduler)."""
    request = LoadRequest.model_validate(payload)
    loader = _require_context().loader
    if loader is None:
        raise RuntimeError("this worker does not load models on demand (worker.on_demand is off)")
    return loader(request)


# The contract names these functions for the server, which never imports this module.
assert f"{__name__}.{generate.__name__}" == GENERATE_JOB and f"{__name__}.{embed.__name__}" == EMBED_JOB
assert f"{__name__}.{load.__name__}" == LOAD_JOB
JOBS = frozenset({GENERATE_JOB, EMBED_JOB, LOAD_JOB})


def refusal(job: Job) -> str | None:
    """Why a dequeued job must not run at all, or None.

    RQ runs whatever callable a job names; anything that can write to Redis could name any. A
    worker runs only ollm's own jobs, and a job whose data cannot even be decoded is failed
    instead of raising out of the worker's loop (which would stop the worker)."""
    try:
        name, instance = job.func_name, job.instance
    except DeserializationError:
        return "the job's data cannot be decoded (not what `ollm serve` enqueues)"
    if name not in JOBS or instance is not None:
        return f"{name!r} is not an ollm job; workers run only {', '.join(sorted(JOBS))}"
    return None
