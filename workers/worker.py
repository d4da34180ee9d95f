"""The `ollm worker` process: an RQ worker that keeps its models loaded and runs many jobs at once.

RQ's default worker forks a horse per job, which would reload the model every time; this one
subclasses ``SimpleWorker`` (jobs run in-process) and hands each dequeued job to a bounded thread
pool, going straight back to dequeueing while up to ``jobs_at_once`` (``worker.max_batch``) jobs are in flight. All of
them submit to the same engine, which batches them. ``perform_job`` is safe to run from several
threads in rq 3: each call gets its own Execution (``worker.executions`` holds many), builds its
own pipelines, and the current job is a context variable. Job timeouts use ``TimerDeathPenalty``
because SIGALRM only reaches the main thread.
"""

from __future__ import annotations

import contextlib
import json
import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import redis
from redis.client import PubSub, PubSubWorkerThread
from rq import Queue
from rq.exceptions import StopRequested
from rq.job import Job
from rq.serializers import JSONSerializer
from rq.timeouts import TimerDeathPenalty
from rq.worker import SimpleWorker, WorkerStatus

from ollm.contract import EMBED_JOB, GENERATE_JOB, LOAD_JOB
from ollm.errors import ServiceUnavailableError
from ollm.generation import ErrorEvent
from ollm.redis_tls import tls_problem
from workers.heartbeat import Heartbeat
from workers.job import JobContext, refusal

log = logging.getLogger(__name__)

_BEAT_EVERY = 1.0
# How long one blocking pop waits for a job: also how soon a stop request is honoured while idle.
_POLL_SECONDS = 1
# How long one read of a pub/sub channel blocks: also how soon its thread stops when asked.
_CHANNEL_READ_SECONDS = 0.1
# The pop's length while batch lines wait for a slot of this worker's to free up.
_BATCH_RECHECK_SECONDS = 0.05
# A job handed back to its queue: tries, and the pause before each retry (Redis blinking).
_HAND_BACK_TRIES = 3
_HAND_BACK_PAUSE = 0.2


def hand_back(connection: redis.Redis, queue_key: str, job_id: str) -> bool:
    """Put a job this worker popped but will not run back at the front of its queue.

    A Redis error is retried; if every try fails the job is logged by id (it stays ``queued`` in
    no queue, which the server's check of the waiting request finds and requeues), never dropped
    silently. True once it is back."""
    for attempt in range(1, _HAND_BACK_TRIES + 1):
        try:
            connection.lpush(queue_key, job_id)
            return True
        except redis.RedisError as exc:
            if attempt == _HAND_BACK_TRIES:
                log.error(
                    "could not hand job %s back to %s after %d tries (%s); it waits for the server to requeue it",
                    job_id, queue_key, attempt, exc,
                )  # fmt: skip
                return False
            log.warning("could not hand job %s back to %s (%s); trying again", job_id, queue_key, exc)
            time.sleep(_HAND_BACK_PAUSE * attempt)
    raise AssertionError("unreachable")


class GenerationWorker(SimpleWorker):
    death_penalty_class = TimerDeathPenalty
    # After a Redis outage, be back within seconds rather than RQ's default of up to a minute.
    max_connection_wait_time = 2.0
    # At hundreds of jobs a second, one log line per job is enough.
    log_result_lifespan = False

    def __init__(
        self,
        queues: list[str],
        connection: redis.Redis,
        context: JobContext,
        max_concurrency: int,
        heartbeat_seconds: float,
        name: str | None = None,
        status: Callable[[], dict[str, str | int]] | None = None,
        drain_seconds: float = 60.0,
        batch_slots: int = 2,
    ) -> None:
        super().__init__(queues, name=name, connection=connection, serializer=JSONSerializer)
        # Batch API lines run in at most this many slots; the rest stay free for interactive work.
        self._batch_slots = min(batch_slots, max_concurrency)
        self._batch_prefix = context.keys.batch_queue("")
        self._batch_running = 0
        # First, its own queue: the loads the server's scheduler places on this worker.
        own = Queue(context.keys.worker_queue(self.name), connection=connection, serializer=JSONSerializer)
        self._queue_lock = threading.Lock()
        self._set_queues([own, *self.queues])
        self.context = context
        self.drain_seconds = drain_seconds
        self._slots = threading.BoundedSemaphore(max_concurrency)
        self._pool = ThreadPoolExecutor(max_concurrency, thread_name_prefix="ollm-job")
        self._loads = ThreadPoolExecutor(1, thread_name_prefix="ollm-load")
        self._running = 0
        self._running_lock = threading.Lock()
        self._registration = Heartbeat(
            connection,
            context.keys,
            self.name,
            models=sorted(set(context.engines) | set(context.embedders)),
            max_batch=max_concurrency,
            interval=heartbeat_seconds,
            in_flight=context.in_flight,
            status=status,
        )
        self._last_beat = -_BEAT_EVERY
        self._cancel_pubsub: PubSub | None = None
        self._cancel_thread: PubSubWorkerThread | None = None

    def bootstrap(self, *args: Any, **kwargs: Any) -> None:
        # RQ installs its handlers only after bootstrap, where this worker already registers: a
        # SIGTERM in between would kill it with its registration left behind, not drain it.
        self._install_signal_handlers()
        super().bootstrap(*args, **kwargs)
        self._listen_for_cancels()
        # Registered last: the server routes here only once this worker can take jobs.
        self._registration.start()

    def subscribe(self) -> None:
        # RQ's own, but its command-channel thread reads for up to 60 s at a time, and redis-py 8.2's
        # PubSubWorkerThread.stop() waits for that read to end: a stopping worker under load hung
        # there until its supervisor killed it (15 s later). A short read keeps the stop prompt.
        self.log.info("Worker %s: subscribing to channel %s", self.name, self.pubsub_channel_name)
        self.pubsub = self.connection.pubsub()
        self.pubsub.subscribe(**{self.pubsub_channel_name: self.handle_payload})
        self.pubsub_thread = self.pubsub.run_in_thread(  # type: ignore[assignment]  # RQ infers None for it
            sleep_time=_CHANNEL_READ_SECONDS, daemon=True, exception_handler=self._pubsub_exception_handler
        )

    def heartbeat(self, timeout: int | None = None, pipeline: Any = None) -> None:
        # RQ beats before every dequeue and after every job, three round trips each time, on the
        # thread that dequeues, just when a new job's first token is on its way. The worker key
        # lives for minutes (worker_ttl): once a second is plenty. Beats inside RQ's own
        # pipelines cost no extra round trip and always go through.
        if pipeline is None and time.monotonic() - self._last_beat < _BEAT_EVERY:
            return
        self._last_beat = time.monotonic()
        try:
            super().heartbeat(timeout, pipeline)
        except (redis.ConnectionError, redis.TimeoutError):
            # RQ's dequeue loop retries a lost Redis forever, beating (here) before each pop, where
            # no job is held: stopping, there is nothing to wait for.
            self._raise_if_stopping()
            raise

    def dequeue_job_and_maintain_ttl(
        self, timeout: int | None, max_idle_time: int | None = None
    ) -> tuple[Job, Queue] | None:
        # A stop request only sets a flag, seen here between short blocking pops. Were it raised
        # from the signal handler instead, it could land after RQ's pop took a job off its queue
        # and before the job was started: a job in no queue and no registry, lost to everyone.
        # Only take a job off the queue when there is a slot for it, so a busy worker leaves
        # queued jobs to idle workers.
        while not self._slots.acquire(timeout=_POLL_SECONDS):
            self._raise_if_stopping()
        try:
            while True:
                self._raise_if_stopping()
                # RQ returns None once it has blocked for max_idle_time without a job.
                result = self._dequeue()
                if result is not None:
                    return result
        except BaseException:
            self._slots.release()
            raise

    def _raise_if_stopping(self) -> None:
        if self._stop_requested:
            raise StopRequested()

    def _dequeue(self) -> tuple[Job, Queue] | None:
        """One short blocking pop over the interactive queues first (BLPOP takes the first key that
        has a job), then the batch queues, which are left out while they may not start a line
        (``_batch_open``); the next poll looks again, so a batch slot that frees up is used soon."""
        with self._queue_lock:
            every = self.queues
            closed = not self._batch_open()
            self._ordered_queues = [q for q in every if not self._is_batch(q)] if closed else every
        # Batch lines are shut out only while this worker runs some: it is busy, and a short pop
        # lets the next line start as soon as a slot frees (a 1 s pop held each slot idle for up
        # to a second after its line ended: two lines a second per worker, measured).
        poll = _BATCH_RECHECK_SECONDS if closed else _POLL_SECONDS
        return super().dequeue_job_and_maintain_ttl(poll, max_idle_time=poll)  # type: ignore[arg-type]  # RQ types them int; BLPOP takes float seconds

    def _batch_open(self) -> bool:
        """Whether a batch line may start: one always may (a batch never starves), more only
        while no interactive request runs here (they fill idle capacity, up to the batch slots).
        Every extra sequence in the engine's batch slows each decode step a little."""
        with self._running_lock:
            batch, interactive = self._batch_running, self._running - self._batch_running
        return batch == 0 or (batch < self._batch_slots and interactive == 0)

    def _is_batch(self, queue: Queue) -> bool:
        return queue.name.startswith(self._batch_prefix)

    # ---- models arriving and leaving -----------------------------------------------------------

    def _set_queues(self, queues: list[Queue]) -> None:
        # New lists, never mutated in place: RQ's dequeue loop reads them from another thread.
        # Every batch queue after every interactive one (sorted is stable: the own queue stays first).
        ordered = sorted(queues, key=self._is_batch)
        self.queues = ordered
        self._ordered_queues = list(ordered)

    def served(self, names: list[str], served: bool) -> None:
        """A model arrived (its queues are listened on from the next dequeue) or left; either way
        the registration says so at once."""
        keys = self.context.keys
        with self._queue_lock:
            leaving = {keys.queue(n) for n in names} | {keys.batch_queue(n) for n in names}
            keep = [q for q in self.queues if q.name not in leaving]
            if served:
                keep += [
                    Queue(name, connection=self.connection, serializer=JSONSerializer)
                    for n in names
                    for name in (keys.queue(n), keys.batch_queue(n))
                ]
            self._set_queues(keep)
        try:
            self._registration.beat()
        except redis.RedisError as exc:
            log.warning("could not announce %s: %s", names, exc)

    def reorder_queues(self, reference_queue: Queue) -> None:
        # The queue a job came from may have left meanwhile (its model was evicted).
        with contextlib.suppress(ValueError):
            super().reorder_queues(reference_queue)

    def _holds(self, job: Job) -> bool:
        """Whether this worker still holds the model a generation or embedding job asks for."""
        if job.func_name not in (GENERATE_JOB, EMBED_JOB):
            return True
        try:
            model = job.args[0]["model"]
        except (IndexError, KeyError, TypeError):
            return True  # malformed: let the job function report it
        return model in self.context.engines or model in self.context.embedders

    def execute_job(self, job: Job, queue: Queue) -> None:
        refused = refusal(job)
        if refused is not None:
            log.warning("job %s refused: %s", job.id, refused)
            try:
                self.handle_job_failure(job, queue, exc_string=f"refused by the worker: {refused}")
            except redis.RedisError as exc:
                log.warning("could not record job %s as failed: %s", job.id, exc)
            finally:
                self._slots.release()
            return
        if job.func_name == LOAD_JOB:
            # On the load thread: a load may take minutes, and meanwhile this thread goes on
            # dequeuing for the models already here. The loaded model's queues join the next
            # dequeue (``served``); loads run one at a time (``Residency``).
            with self._running_lock:
                self._running += 1
            self._loads.submit(self._perform, job, queue)
            return
        if not self._holds(job):
            # Dequeued in the moment its model was evicted: back to the front of its queue, where
            # the server's scheduler finds it waiting and has the model loaded again.
            hand_back(self.connection, queue.key, job.id)
            self._slots.release()
            return
        # The engine starts on the request here, on the dequeuing thread, before the job thread
        # runs RQ's bookkeeping (several round trips) and competes with the engine for the GIL.
        self.context.prestart(job)
        with self._running_lock:
            self._running += 1
            if self._is_batch(queue):
                self._batch_running += 1
        self._pool.submit(self._perform, job, queue)

    def _perform(self, job: Job, queue: Queue) -> None:
        try:
            execution = self.prepare_execution(job)
            self.perform_job(job, queue, execution)
        except Exception:
            log.exception("job %s crashed outside RQ's own handling", job.id)
        finally:
            self.context.discard(job.id)
            with self._running_lock:
                self._running -= 1
                if self._is_batch(queue):
                    self._batch_running -= 1
                idle = self._running == 0
            if idle:
                with contextlib.suppress(redis.RedisError):
                    self.set_state(WorkerStatus.IDLE)
            self._slots.release()

    def _shutdown(self) -> None:
        # Jobs run in the pool, so the main loop can always stop taking new ones; teardown waits
        # for the jobs in flight (a second signal makes it a cold shutdown). Never raised from
        # here: the dequeue loop sees the flag within _POLL_SECONDS, and a job it has just popped
        # is still handed to execute_job (and finished by the drain). The server stops routing
        # here at once: the registration advertises no models from the next (immediate) beat.
        self._stop_requested = True
        self._registration.announce_drain()

    def request_force_stop(self, signum: int, frame: Any) -> None:
        self.context.cancel_all()
        super().request_force_stop(signum, frame)

    def teardown(self) -> None:
        self._registration.drain()
        self._drain()
        self._pool.shutdown(wait=True)
        self._loads.shutdown(wait=True)
        self._registration.stop()
        if self._cancel_thread is not None:
            self._cancel_thread.stop()
            self._cancel_thread.join(timeout=2)
        if self._cancel_pubsub is not None:
            self._cancel_pubsub.close()
        try:
            super().teardown()
        except redis.RedisError as exc:
            # Redis went first (e.g. honcho stopping everything at once): nothing left to tell it.
            log.warning("could not deregister from RQ: %s", exc)

    def _drain(self) -> None:
        """Let the generations in flight finish, for at most ``worker.drain_seconds``; then cancel
        them with an error event, so no client mistakes a cut answer for a whole one."""
        started = time.monotonic()
        deadline = started + self.drain_seconds
        running = self._running
        while self._running and time.monotonic() < deadline:
            time.sleep(0.05)
        if self._running:
            message = (
                f"the worker stopped before this answer was finished ({self._running} request(s) still "
                f"running after worker.drain_seconds={self.drain_seconds:g}s); retry the request"
            )
            log.warning("%s", message)
            self.context.abort_all(ErrorEvent(message=message, status=503, code="worker_stopped"))
        elif running:
            log.info("drained %d running request(s) in %.2fs", running, time.monotonic() - started)

    def _listen_for_cancels(self) -> None:
        self._cancel_pubsub = self.connection.pubsub(ignore_subscribe_messages=True)
        self._cancel_pubsub.subscribe(**{self.context.keys.cancel_channel: self._on_cancel})
        # sleep_time bounds each read, and so how long teardown waits for this thread to stop.
        self._cancel_thread = self._cancel_pubsub.run_in_thread(
            sleep_time=_CHANNEL_READ_SECONDS, daemon=True, exception_handler=_log_pubsub_error
        )

    def _on_cancel(self, message: dict[str, Any]) -> None:
        data = message.get("data")
        request_id = data.decode() if isinstance(data, bytes) else str(data)
        self.context.cancel(request_id)


def _log_pubsub_error(exc: BaseException, pubsub: PubSub, thread: PubSubWorkerThread) -> None:
    # The pubsub reconnects and resubscribes on the next read; a Redis blip must not kill cancels.
    log.warning("cancel listener: %s", exc)
    if isinstance(exc, redis.ConnectionError):
        threading.Event().wait(1.0)


def _wait_for_redis(connection: redis.Redis, timeout: float = 60.0) -> None:
    # Under honcho or systemd Redis may still be starting; RQ would give up at its first command.
    deadline = time.monotonic() + timeout
    while True:
        try:
            connection.ping()
            return
        except (redis.ConnectionError, redis.TimeoutError) as exc:
            problem = tls_problem(exc)
            if problem is not None:
                # A certificate that is not trusted today will not be trusted in a minute.
                raise ServiceUnavailableError(f"cannot connect to Redis ({exc}); {problem}") from None
            if time.monotonic() > deadline:
                raise
            log.info("waiting for Redis: %s", exc)
            time.sleep(0.5)


def run_worker(
    models: list[str],
    connection: redis.Redis,
    context: JobContext,
    max_concurrency: int,
    heartbeat_seconds: float,
    log_level: str = "INFO",
    status: Callable[[], dict[str, str | int]] | None = None,
    served: Callable[[GenerationWorker], None] | None = None,
    drain_seconds: float = 60.0,
    batch_slots: int = 2,
) -> None:
    """Serve the given model references (and, with a loader in ``context``, any model the
    scheduler places here) until SIGINT/SIGTERM, then drain: take no new jobs and let the running
    ones finish (at most ``drain_seconds``). ``served`` is called with the worker before it
    starts, to be told of models that arrive and leave."""
    _wait_for_redis(connection)
    queues = [name for model in models for name in (context.keys.queue(model), context.keys.batch_queue(model))]
    worker = GenerationWorker(
        queues, connection, context, max_concurrency, heartbeat_seconds, status=status, drain_seconds=drain_seconds,
        batch_slots=batch_slots,
    )  # fmt: skip
    if served is not None:
        served(worker)
    log.info("worker %s serving %s", worker.name, json.dumps(models))
    worker.work(logging_level=log_level)
