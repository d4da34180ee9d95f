"""Shared dispatch for every API family: route a request to its model's queue and relay the events.

The order is what makes it lossless: subscribe to the job's event channel, wait for Redis to
confirm, and only then enqueue the RQ job, so the first token cannot be published before anyone
listens. While waiting, a quiet stream is checked against the job's real RQ status and its worker's
heartbeat. A dead worker that had not published a token yet costs the client nothing but time: the
job goes back to the front of its queue for another worker (``server.requeue``). After the first
token it ends the request within ``server.worker_lost_seconds`` (and the job is moved to RQ's
failed registry) instead of leaving the client hanging.

A model no live worker holds is placed on one that loads it (``server.scheduler``); its jobs wait
in its queue meanwhile. A derived model (``ollm.derived``) is resolved to its base here, once per
request, so every API family serves it the same way.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any

import redis
import redis.asyncio
from pydantic import TypeAdapter
from redis.asyncio.client import PubSub
from rq import Queue
from rq.exceptions import NoSuchJobError
from rq.executions import ExecutionRegistry
from rq.job import Job, JobStatus
from rq.job_lifecycle import record_job_failure
from rq.serializers import JSONSerializer

from ollm import catalogue
from ollm.contract import EMBED_JOB, GENERATE_JOB, Keys, WorkerInfo, live_workers, worker_age
from ollm.derived import DerivedModel, DerivedModels
from ollm.derived import apply as apply_derived
from ollm.errors import GenerationTimeoutError, OllmError, ServiceUnavailableError
from ollm.generation import (
    EmbeddingRequest,
    EmbeddingResult,
    ErrorEvent,
    Event,
    FinalEvent,
    GenerationRequest,
    TokenEvent,
    TokenLogprob,
)
from ollm.sampling_defaults import configured_fields, model_recommended, with_model_defaults
from ollm.settings import Settings
from server.errors import error_from_event
from server.metrics.instruments import Metrics, StreamObserver
from server.requeue import Requeuer
from server.scheduler import Scheduler

log = logging.getLogger(__name__)

_EVENT = TypeAdapter[Event](Event)
# Results are read back only when a published final event was missed; failures stay for inspection.
_RESULT_TTL = 600
_FAILURE_TTL = 7 * 24 * 3600
Disconnected = Callable[[], Awaitable[bool]]

# Set by the Batch API runner around each line it runs through the app: that line's jobs go to
# the model's batch queue, which workers serve only after their interactive queues.
batch_priority: ContextVar[bool] = ContextVar("batch_priority", default=False)


class ClientDisconnected(OllmError):
    """The client went away while waiting; its job has been cancelled. Nobody reads the answer."""

    status = 499
    code = "client_closed_request"

    def __init__(self) -> None:
        super().__init__("the client closed the connection")


@dataclass
class Completed:
    """A finished non-streaming generation: the final event and the per-token logprobs, if asked."""

    final: FinalEvent
    logprobs: list[TokenLogprob]


class Dispatcher:
    def __init__(
        self, settings: Settings, sync: redis.Redis, connection: redis.asyncio.Redis, metrics: Metrics | None = None
    ) -> None:
        self.settings = settings
        # The app's Prometheus instruments (GET /metrics), fed by every JobStream.
        self.metrics = metrics or Metrics()
        self.keys = Keys(settings.redis.namespace)
        self.sync = sync
        self.connection = connection
        self.lost_after = settings.server.worker_lost_seconds
        # Quiet streams are checked this often; a dead worker is noticed within lost_after + tick.
        self.tick = min(1.0, self.lost_after / 4)
        self._served: tuple[float, set[str]] = (0.0, set())
        self.subscriptions = Subscriptions(connection)
        self._queues: dict[str, Queue] = {}
        self.scheduler = Scheduler(settings, sync, connection, self.keys)
        self.derived = DerivedModels(connection, self.keys)
        self.requeuer = Requeuer(connection)
        self._background: set[asyncio.Task[None]] = set()

    async def workers(self) -> list[WorkerInfo]:
        workers = await live_workers(self.connection, self.keys, self.lost_after)
        self._served = (time.monotonic(), {model for worker in workers for model in worker.models})
        return workers

    async def serving(self, model: str) -> list[WorkerInfo]:
        return [w for w in await self.workers() if model in w.models]

    async def serves(self, model: str) -> bool:
        """Whether a live worker serves ``model``.

        Under load every request would re-read every registration; a served model is trusted for
        one tick (a worker lost meanwhile is caught by the job checks), an unserved one is re-read
        so a worker that just started is used at once.
        """
        read_at, served = self._served
        if model in served and time.monotonic() - read_at < self.tick:
            return True
        return bool(await self.serving(model))

    async def route(self, model: str) -> None:
        """Make sure ``model`` is served or on its way: a model no live worker holds is placed on
        one that loads it (server/scheduler.py); raises 400/404 for names that are no servable
        model and 503 when no live worker can ever load it."""
        if await self.serves(model):
            # Off the request's path, and at most once a second per model.
            if self.scheduler.replica_due(model):
                self._in_background(self._consider_replica(model))
            return
        workers = await self.workers()
        if any(model in worker.models for worker in workers):
            return
        await self.scheduler.place(model, workers)

    async def load(self, model: str, timeout: float) -> bool:
        """Have ``model`` loaded (Ollama's empty prompt); whether it is served within ``timeout``."""
        await self.route(model)
        deadline = time.monotonic() + timeout
        while not await self.serving(model):
            if time.monotonic() > deadline:
                return False
            ending = await self.scheduler.waiting(model, await self.workers())
            if ending is not None:
                raise error_from_event(ErrorEvent.model_validate(ending))
            await asyncio.sleep(self.tick / 4)
        return True

    async def resolve(self, model: str) -> DerivedModel | None:
        """The derived model (/api/create, /api/copy) a name means, if any. A name a live worker
        serves is a real model: the warm path asks Redis nothing more."""
        if await self.serves(model):
            return None
        return await self.derived.get(model)

    async def _consider_replica(self, model: str) -> None:
        try:
            # One LLEN; the workers are read only for a queue that is deep.
            if await self.scheduler.deep(model):
                await self.scheduler.consider_replica(model, await self.workers())
        except (OllmError, redis.RedisError) as exc:
            log.debug("replica check of %s: %s", model, exc)

    def _in_background(self, work: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(work)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def submit(self, request: GenerationRequest) -> JobStream:
        """Enqueue a generation; the returned stream yields its events. A derived model's request
        goes to its base with the derived defaults applied; a model no worker holds is loaded
        first (the job waits in its queue meanwhile)."""
        derived = await self.resolve(request.model)
        if derived is not None:
            request = apply_derived(request, derived)
        request = await asyncio.to_thread(self._with_model_defaults, request)
        return await self._submit(request.model, request.id, GENERATE_JOB, request.model_dump(mode="json"))

    def _with_model_defaults(self, request: GenerationRequest) -> GenerationRequest:
        """The model's generation_config.json recommendations in the sampling fields nobody chose
        (read where this server sees the model's directory; otherwise the configured defaults stay)."""
        try:
            path = catalogue.materialized_path(request.model, self.settings.runtime)
        except OllmError:
            return request
        configured = configured_fields(self.settings.generation)
        sampling = with_model_defaults(request.sampling, model_recommended(path), configured)
        return request if sampling is request.sampling else request.model_copy(update={"sampling": sampling})

    async def generate(self, request: GenerationRequest, disconnected: Disconnected | None = None) -> Completed:
        """Run a generation to completion; an error event is raised as the matching ApiError."""
        stream = await self.submit(request)
        logprobs: list[TokenLogprob] = []
        try:
            async for event in stream.events(disconnected):
                if isinstance(event, TokenEvent):
                    logprobs += event.logprobs
                elif isinstance(event, FinalEvent):
                    return Completed(event, logprobs)
                else:
                    raise error_from_event(event)
            raise AssertionError("a job stream always ends with a final or error event")
        finally:
            await stream.close()

    async def embed(self, request: EmbeddingRequest) -> EmbeddingResult:
        derived = await self.resolve(request.model)
        if derived is not None:
            request = request.model_copy(update={"model": derived.base})
        stream = await self._submit(request.model, uuid.uuid4().hex, EMBED_JOB, request.model_dump(mode="json"))
        try:
            message = await stream.next_message()
        finally:
            await stream.close()
        if message.get("type") == "embedding":
            return EmbeddingResult.model_validate({k: v for k, v in message.items() if k != "type"})
        raise error_from_event(ErrorEvent.model_validate(message))

    async def _submit(self, model: str, job_id: str, function: str, payload: dict[str, Any]) -> JobStream:
        started = time.monotonic()
        await self.route(model)
        queue = await self._queue(model, batch=batch_priority.get())
        channel = self.keys.events(job_id)
        pubsub = await self.subscriptions.subscribe(channel)
        try:
            # RQ builds the job while Redis confirms the subscription; the job is written only
            # once it is confirmed, so not even its first event can be missed.
            writes = self._job_writes(queue, model, job_id, function, payload)
            await self.subscriptions.confirmed(pubsub)
            await self._write(writes)
        except BaseException:
            await self.subscriptions.release(pubsub, channel)
            raise
        observer = self.metrics.stream(model, "embed" if function == EMBED_JOB else "generate", started)
        return JobStream(self, pubsub, channel, job_id, model, observer)

    def _job_writes(
        self, queue: Queue, model: str, job_id: str, function: str, payload: dict[str, Any]
    ) -> redis.client.Pipeline:
        """The writes that enqueue a job, as RQ makes them, on a pipeline not yet executed.

        They go to Redis through ``_write``: one round trip on the event loop rather than RQ's own
        two, blocking, in a thread.
        """
        timeout = self.settings.server.request_timeout_seconds
        writes = self.sync.pipeline()
        queue.enqueue(
            function,
            payload,
            job_id=job_id,
            job_timeout=math.ceil(timeout) + 30,
            # A job nobody picked up within the request's own timeout is of no use to anyone.
            ttl=math.ceil(timeout),
            result_ttl=_RESULT_TTL,
            failure_ttl=_FAILURE_TTL,
            description=f"{function.rsplit('.', 1)[-1]} {model}",
            pipeline=writes,
        )
        return writes

    async def _write(self, writes: redis.client.Pipeline) -> None:
        async with self.connection.pipeline(transaction=True) as pipe:
            for args, options in writes.command_stack:
                pipe.pipeline_execute_command(*args, **options)
            await pipe.execute()

    async def _queue(self, model: str, batch: bool = False) -> Queue:
        name = self.keys.batch_queue(model) if batch else self.keys.queue(model)
        queue = self._queues.get(name)
        if queue is None:
            queue = Queue(name, connection=self.sync, serializer=JSONSerializer)
            # Asked once per queue (it shapes how RQ writes a job); the only blocking call here.
            await asyncio.to_thread(queue.get_redis_server_version)
            self._queues[name] = queue
        return queue

    async def cancel(self, job_id: str) -> None:
        """Stop a job: the worker running it cancels within a few tokens; a queued one never runs."""
        async with self.connection.pipeline(transaction=False) as pipe:
            pipe.set(self.keys.cancelled(job_id), 1, ex=int(self.settings.server.request_timeout_seconds) + 60)
            pipe.publish(self.keys.cancel_channel, job_id)
            await pipe.execute()
        await asyncio.to_thread(self._cancel_if_queued, job_id)

    def _cancel_if_queued(self, job_id: str) -> None:
        job, status = self._job_status(job_id)
        if job is not None and status == JobStatus.QUEUED:
            job.cancel()

    async def check_job(
        self, job_id: str, model: str, requeue: bool = False, watch: QueueWatch | None = None
    ) -> dict[str, Any] | None:
        """The message that ends a quiet stream whose job can no longer produce one, else None.

        With ``requeue`` (nothing of the answer has reached the client yet) a job whose worker
        died is put back on its queue instead: another worker serves it from the start. With
        ``watch`` (the stream's memory of earlier checks) a queued job that has been missing from
        its queue at two checks in a row goes back on it (a worker died while dequeuing it).
        """
        job, status = await asyncio.to_thread(self._job_status, job_id)
        if watch is not None and status != JobStatus.QUEUED:
            watch.missing = 0
        if job is None:
            return _error("the job vanished from Redis before it finished", 500, "job_lost")
        if status == JobStatus.FINISHED:
            # The final event was published while the subscription was down; the result has it.
            result = await asyncio.to_thread(job.return_value)
            if isinstance(result, dict):
                # A generation's result is its final event; an embedding job's is the bare result.
                return result if "type" in result else {"type": "embedding", **result}
            return _error("the job finished without a result", 500, "job_lost")
        if status in (JobStatus.FAILED, JobStatus.STOPPED, JobStatus.CANCELED):
            return _error(f"the job {status.value}", 500, "generation_failed")
        if status == JobStatus.STARTED:
            age = await worker_age(self.connection, self.keys, job.worker_name or "")
            if age is None or age > self.lost_after:
                if requeue and job.worker_name:
                    # False: another check (a second replica) got there first; either way the
                    # job is no longer the dead worker's, and the next check sees its new state.
                    if await self.requeuer.requeue(job.id, job.worker_name):
                        log.warning(
                            "worker %s died before the first token of job %s; requeued", job.worker_name, job.id
                        )
                    return None
                message = (
                    f"worker {job.worker_name} serving model {model!r} stopped responding "
                    f"(no heartbeat for over {self.lost_after:g}s); the request was abandoned"
                )
                await asyncio.to_thread(self._fail_lost_job, job, message)
                return _error(message, 503, "worker_lost")
            return None
        if status == JobStatus.QUEUED:
            if watch is not None and await self._requeued_unqueued(job, watch):
                return None
            workers = await self.workers()
            if any(model in worker.models for worker in workers):
                # Waiting for a busy model: its queue may be deep enough for a replica.
                if self.scheduler.replica_due(model):
                    await self.scheduler.consider_replica(model, workers)
                return None
            # Waiting for its model to load: fine while the load is on its way.
            ending = await self.scheduler.waiting(model, workers)
            if ending is not None:
                await asyncio.to_thread(job.cancel)
            return ending
        return None

    async def _requeued_unqueued(self, job: Job, watch: QueueWatch) -> bool:
        """Whether a queued job that is in no queue was put back on its own.

        RQ's dequeue pops the id first and marks the job started a few round trips later; a
        worker that dies in between strands it. A live worker crosses that gap in milliseconds,
        so only a job missing at two checks (a tick apart) is requeued. The job's own queue is
        looked at (its origin): a Batch API line waits in the model's batch queue, and looking
        for it in the interactive one would put a waiting line on both, to be run twice."""
        job_id = job.id
        queue_key = f"{Queue.redis_queue_namespace_prefix}{job.origin}"
        if not await self.requeuer.missing(job_id, queue_key):
            watch.missing = 0
            return False
        watch.missing += 1
        if watch.missing < 2:
            return False
        watch.missing = 0
        if await self.requeuer.requeue_unqueued(job_id, queue_key):
            log.warning("job %s was taken off its queue by a worker that never started it; requeued", job_id)
            return True
        return False

    def _job_status(self, job_id: str) -> tuple[Job | None, JobStatus | None]:
        try:
            job = Job.fetch(job_id, connection=self.sync, serializer=JSONSerializer)
        except NoSuchJobError:
            return None, None
        return job, job.get_status(refresh=False)

    def _fail_lost_job(self, job: Job, message: str) -> None:
        """What RQ's own abandoned-job cleanup does, now rather than after the execution TTL."""
        with self.sync.pipeline() as pipe:
            record_job_failure(job, f"AbandonedJobError: {message}", pipe)
            pipe.execute()
        try:
            with self.sync.pipeline() as pipe:
                ExecutionRegistry(job.id, self.sync).delete(job, pipe)
                pipe.execute()
        except (ValueError, redis.RedisError) as exc:
            # Leftover started-registry entries are harmless: RQ skips jobs that are not STARTED.
            log.debug("could not clear executions of lost job %s: %s", job.id, exc)


class Subscriptions:
    """Pub/sub connections for job event channels, kept open and reused.

    Opening a connection per request (connect, HELLO, CLIENT SETINFO) cost more than the rest of
    dispatch together. A connection goes back to the idle list only after Redis has acknowledged
    the unsubscribe, so no late event of one job can reach the next.
    """

    def __init__(self, connection: redis.asyncio.Redis, keep: int = 64) -> None:
        self.connection = connection
        self.keep = keep
        self._idle: list[PubSub] = []

    async def subscribe(self, channel: str) -> PubSub:
        """A pub/sub that has sent its subscription to ``channel``; see ``confirmed``."""
        pubsub = self._idle.pop() if self._idle else self.connection.pubsub()
        try:
            await pubsub.subscribe(channel)
        except BaseException:
            await _close(pubsub)
            raise
        return pubsub

    async def confirmed(self, pubsub: PubSub) -> None:
        """Return once Redis has confirmed the subscription: events published after it arrive."""
        if not await self._acknowledged(pubsub, "subscribe"):
            raise ServiceUnavailableError("Redis did not confirm the event subscription")

    async def release(self, pubsub: PubSub, channel: str) -> None:
        if len(self._idle) >= self.keep:
            await _close(pubsub)
            return
        try:
            await pubsub.unsubscribe(channel)
            if await self._acknowledged(pubsub, "unsubscribe"):
                self._idle.append(pubsub)
                return
        except (redis.RedisError, OSError) as exc:
            log.debug("dropping pub/sub connection: %s", exc)
        await _close(pubsub)

    async def _acknowledged(self, pubsub: PubSub, kind: str) -> bool:
        # Events published before an unsubscribe is acknowledged are read and dropped here.
        deadline = time.monotonic() + 5.0
        while (remaining := deadline - time.monotonic()) > 0:
            message = await pubsub.get_message(timeout=remaining)
            if message is not None and message.get("type") == kind:
                return True
        return False


async def _close(pubsub: PubSub) -> None:
    try:
        await pubsub.aclose()
    except (redis.RedisError, OSError) as exc:
        log.debug("closing pub/sub connection: %s", exc)


@dataclass
class QueueWatch:
    """What the checks of one stream remember: at how many checks in a row its queued job was in
    no queue."""

    missing: int = 0


class JobStream:
    """The events of one enqueued job, read from its pub/sub channel; ``close`` when done."""

    def __init__(
        self,
        dispatcher: Dispatcher,
        pubsub: PubSub,
        channel: str,
        job_id: str,
        model: str,
        observer: StreamObserver | None = None,
    ) -> None:
        self.dispatcher = dispatcher
        # Every family's events pass here: the one place they are timed and counted (metrics).
        self.observer = observer
        self.pubsub = pubsub
        self.channel = channel
        self.id = job_id
        self.model = model
        self.deadline = time.monotonic() + dispatcher.settings.server.request_timeout_seconds
        self.finished = False
        # Whether any token reached us: until then a dead worker's job can simply run again.
        self.streaming = False
        self._closed = False
        self._client_checked = time.monotonic()
        self._watch = QueueWatch()

    async def next_message(self, disconnected: Disconnected | None = None) -> dict[str, Any]:
        dispatcher = self.dispatcher
        quiet_since = time.monotonic()
        while True:
            now = time.monotonic()
            if self.deadline <= now:
                await self._cancel_quietly()
                self.finished = True
                timeout = dispatcher.settings.server.request_timeout_seconds
                raise GenerationTimeoutError(
                    f"the request did not finish within {timeout:g}s (server.request_timeout_seconds)"
                )
            # Once per tick, whether or not tokens are flowing: nobody may be waiting any more.
            if disconnected is not None and now - self._client_checked >= dispatcher.tick:
                self._client_checked = now
                if await disconnected():
                    raise ClientDisconnected()
            message = await self.pubsub.get_message(
                ignore_subscribe_messages=True, timeout=min(dispatcher.tick, self.deadline - now)
            )
            if message is not None and message.get("type") == "message":
                data: dict[str, Any] = json.loads(message["data"])
                kind = data.get("type")
                self.finished = kind in ("final", "error", "embedding")
                self.streaming = self.streaming or kind == "token"
                return self._observed(data)
            if time.monotonic() - quiet_since >= dispatcher.tick:
                ending = await dispatcher.check_job(self.id, self.model, requeue=not self.streaming, watch=self._watch)
                if ending is not None:
                    self.finished = True
                    return self._observed(ending)
                quiet_since = time.monotonic()

    def _observed(self, data: dict[str, Any]) -> dict[str, Any]:
        if self.observer is not None:
            self.observer.message(data)
        return data

    async def next_event(self, disconnected: Disconnected | None = None) -> Event:
        return _EVENT.validate_python(await self.next_message(disconnected))

    async def events(self, disconnected: Disconnected | None = None) -> AsyncIterator[Event]:
        while not self.finished:
            yield await self.next_event(disconnected)

    async def close(self) -> None:
        """Unsubscribe; a job that has not finished (client gone, error) is cancelled first."""
        if self._closed:
            return
        self._closed = True
        if self.observer is not None:
            self.observer.closed()
        if not self.finished:
            await self._cancel_quietly()
        await self.dispatcher.subscriptions.release(self.pubsub, self.channel)

    async def _cancel_quietly(self) -> None:
        try:
            await self.dispatcher.cancel(self.id)
        except redis.RedisError as exc:
            log.warning("could not cancel job %s: %s", self.id, exc)


def _error(message: str, status: int, code: str) -> dict[str, Any]:
    return ErrorEvent(message=message, status=status, code=code).model_dump(mode="json")
