"""The model scheduler: which worker loads a model no live worker holds, decided through Redis.

A request for a model nobody serves is not refused. Its job is enqueued on the model's queue as
usual, where it waits, and the scheduler places one load:

1. it checks the name (400/404 for what is no servable model) and sizes the model on each
   worker by the expected peak of that worker's own plan of it (weights held, KV cache,
   activations), which every worker publishes in its registration for the models under its
   models directory; only without one, by its weight files in the worker's dtype plus 10% (the
   server never plans: that would import torch);
2. a model larger than every live worker could ever hold fails at once (503, sizes named);
3. it picks a worker (``choose``): room now first, else the one that frees most by evicting idle
   models; then claims the load with ``SET NX`` on ``Keys.load_claim(model)``, so concurrent first
   requests, on any server replica, cause exactly one load, and enqueues ``LOAD_JOB`` on that
   worker's own queue (workers/loads.py does the rest).

While a job waits, ``waiting`` tells the dispatcher whether the load is still coming, re-checking
the claim's worker each time: a worker still beating is loading (its registration shows the load's
progress; a load may take minutes, the heartbeat never waits on it); one that stopped beating fails
the waiting requests (503 ``worker_lost``) and the load is placed again on another worker; one
that is stopping (draining) gives the load up to another worker while the requests keep waiting;
a failed load ends them with its reason; a load that is neither running nor done (the model was
evicted meanwhile) is placed again. A claim whose load job could not be enqueued is dropped at
once.

When a served model's queue gets deep (``server.replica_queue_depth``), a second worker with
room loads a replica.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
import uuid
from dataclasses import dataclass
from typing import Any

import redis
import redis.asyncio
from rq import Queue
from rq.serializers import JSONSerializer

from ollm import catalogue
from ollm.contract import LOAD_JOB, Keys, LoadedModel, LoadRequest, WorkerInfo, live_workers, loaded_models
from ollm.errors import (
    InvalidReferenceError,
    ModelNotFoundError,
    OllmError,
    ServiceUnavailableError,
)
from ollm.generation import ErrorEvent
from ollm.settings import Settings

log = logging.getLogger(__name__)

# Estimates are read from disk once per model and server; a re-pull is rare enough.
_ESTIMATE_TTL = 300.0


@dataclass(frozen=True)
class Weights:
    """What the server knows of a model's size without planning it: its weight files, and the
    directory under models_dir whose planned peak each worker publishes."""

    bytes: int
    stored_dtype: str
    directory: str | None = None

    def planned(self, worker: WorkerInfo) -> int | None:
        """The model's expected peak as ``worker`` would run it, from its own plan; None when it
        published none (its plan cannot estimate the model, or has not run since the pull)."""
        return worker.peaks.get(self.directory) if self.directory is not None else None

    def on(self, worker: WorkerInfo) -> int:
        """Bytes a loaded copy takes on ``worker``: the planned peak; without one, the weights in
        the dtype the worker runs models in, plus 10%."""
        planned = self.planned(worker)
        if planned is not None:
            return planned
        return catalogue.scaled_memory(self.bytes, self.stored_dtype, worker.dtype or self.stored_dtype)


@dataclass(frozen=True)
class Candidate:
    worker: WorkerInfo
    size: int  # bytes the model would take there
    capacity: int  # bytes it could ever give this model: its budget less its pinned models
    free: int  # bytes free now
    evictable: int  # bytes held by idle models it may evict
    slots: bool  # below max_loaded_models now


def gib(size: int) -> str:
    return f"{size / 2**30:.2f} GiB"


def candidates(
    workers: list[WorkerInfo], loaded: list[dict[str, LoadedModel]], model: str, weights: Weights
) -> list[Candidate]:
    """Live workers that load on demand, are not stopping and do not hold ``model``, with their
    memory. (A draining worker advertises no models: it would take the load and never run it.)"""
    out = []
    for worker, models in zip(workers, loaded, strict=True):
        if not worker.on_demand or worker.draining or model in worker.models:
            continue
        unlimited = worker.memory_budget <= 0
        pinned = sum(m.size for m in models.values() if m.pinned)
        idle = sum(m.size for m in models.values() if not m.pinned and m.in_flight == 0)
        out.append(
            Candidate(
                worker=worker,
                size=weights.on(worker),
                capacity=math.inf if unlimited else worker.memory_budget - pinned,  # type: ignore[arg-type]
                free=math.inf if unlimited else worker.memory_budget - worker.memory_used,  # type: ignore[arg-type]
                evictable=idle,
                slots=not worker.max_loaded_models or len(models) < worker.max_loaded_models,
            )
        )
    return out


def choose(found: list[Candidate], replica: bool = False) -> Candidate | None:
    """Where the model goes: a worker with room now (most free first); else, unless this is a
    replica, the one that can make most room by evicting idle models. None: nowhere."""
    now = [c for c in found if c.free >= c.size and c.slots and c.capacity >= c.size]
    if now:
        return max(now, key=lambda c: (c.free, -c.worker.in_flight))
    if replica:
        return None
    later = [c for c in found if c.capacity >= c.size]
    if not later:
        return None
    return max(later, key=lambda c: (c.free + c.evictable, -c.worker.in_flight))


def too_large(model: str, found: list[Candidate]) -> str:
    budgets = ", ".join(
        f"{c.worker.name} {gib(c.worker.memory_budget)}"
        + (f" ({gib(c.worker.memory_budget - int(c.capacity))} pinned)" if c.capacity < c.worker.memory_budget else "")
        for c in found
    )
    size = min(c.size for c in found)
    return (
        f"model {model!r} needs about {gib(size)} of memory, more than any live worker can hold "
        f"(memory budgets: {budgets}); raise worker.memory_budget or start a worker with more memory"
    )


class Scheduler:
    def __init__(
        self, settings: Settings, sync: redis.Redis, connection: redis.asyncio.Redis, keys: Keys
    ) -> None:
        self.settings = settings
        self.sync = sync
        self.connection = connection
        self.keys = keys
        self.lost_after = settings.server.worker_lost_seconds
        self._weights: dict[str, tuple[float, Weights]] = {}
        self._replica_checked: dict[str, float] = {}

    async def weights(self, model: str) -> Weights:
        """The model's weight files; raises for no servable model. Read from disk, never planned:
        planning needs the device, and finding it would import torch into the server."""
        cached = self._weights.get(model)
        if cached is not None and time.monotonic() - cached[0] < _ESTIMATE_TTL:
            return cached[1]
        weights = await asyncio.to_thread(self._weights_of, model)
        self._weights[model] = (time.monotonic(), weights)
        return weights

    def _weights_of(self, model: str) -> Weights:
        runtime = self.settings.runtime
        ref = catalogue.resolve(model, runtime)
        if catalogue.is_echo(ref):
            return Weights(0, "float32")
        if ref.kind == "local_path":
            models_dir = runtime.resolved_models_dir().resolve()
            path = ref.path
            assert path is not None
            if not path.is_relative_to(models_dir):
                raise InvalidReferenceError(
                    f"model {model!r} is a path outside the models directory ({models_dir}); the server loads "
                    "models from there only. Use the model's name, or start a worker with `--model <path>`",
                    param="model",
                )
        try:
            found = catalogue.materialized_path(ref, runtime)
        except OllmError:
            raise
        except Exception as exc:  # a broken directory or manifest: the client named something unservable
            raise ModelNotFoundError(f"model {model!r} cannot be served: {exc}", param="model") from exc
        if found is None:
            if ref.is_local:
                catalogue.require_materialized(ref, runtime)  # raises the 404 that says what is missing
            raise ServiceUnavailableError(
                f"no live worker serves model {model!r} and it is not pulled here; run `ollm pull {model}` "
                f"and it loads on first use, or start `ollm worker --model {model}` where it is",
                param="model",
            )
        size, stored = catalogue.weight_bytes(found)
        # Workers publish planned peaks for the directories right under their models_dir.
        directory = found.name if found.resolve().parent == runtime.resolved_models_dir().resolve() else None
        return Weights(size, stored, directory)

    async def place(self, model: str, workers: list[WorkerInfo], replica: bool = False) -> None:
        """Have a worker load ``model`` unless a load of it is already under way. Raises
        ServiceUnavailableError when no live worker can ever load it."""
        weights = await self.weights(model)
        loaded = await asyncio.gather(*(loaded_models(self.connection, self.keys, w) for w in workers))
        found = candidates(workers, list(loaded), model, weights)
        if not found:
            if replica:
                return
            raise ServiceUnavailableError(
                f"no live worker serves model {model!r} or loads models on demand; start one with "
                f"`ollm worker` (it loads what is asked for) or `ollm worker --model {model}`",
                param="model",
            )
        unplanned = [c.worker.name for c in found if weights.planned(c.worker) is None]
        if unplanned and weights.bytes:
            log.info(
                "no planned peak of %s from worker(s) %s (their plan cannot estimate it, or has not run since it "
                "was pulled); counting its weights plus 10%%",
                model,
                ", ".join(unplanned),
            )
        chosen = choose(found, replica)
        if chosen is None:
            if replica:
                return
            raise ServiceUnavailableError(too_large(model, found), param="model")
        request = LoadRequest(model=model, worker=chosen.worker.name, claim=uuid.uuid4().hex, replica=replica)
        ttl = math.ceil(self.settings.server.request_timeout_seconds) + 60
        if not await self.connection.set(self.keys.load_claim(model), request.model_dump_json(), nx=True, ex=ttl):
            return  # another request placed it: this one waits for the same load
        if not replica and await self._served_now(model):
            await self._drop_claim(request)
            return
        await self.connection.delete(self.keys.load_failed(model))
        kind = "a replica of " if replica else ""
        log.info("placing %s%s on worker %s (about %s)", kind, model, chosen.worker.name, gib(chosen.size))
        try:
            await asyncio.to_thread(self._enqueue_load, request)
        except redis.RedisError as exc:
            # A claim with no job behind it would hold every request for this model until it expired.
            await self._drop_claim(request)
            raise ServiceUnavailableError(
                f"could not place the load of model {model!r} on worker {chosen.worker.name}: {exc}; retry the request",
                param="model",
            ) from exc

    async def _served_now(self, model: str) -> bool:
        """Whether a live worker serves ``model``, read after taking its claim: the caller's workers
        were read before it, and a load may have ended in between (its worker announces the model
        before it releases its claim, so this read sees it)."""
        return any(model in w.models for w in await live_workers(self.connection, self.keys, self.lost_after))

    def _enqueue_load(self, request: LoadRequest) -> None:
        timeout = math.ceil(self.settings.server.request_timeout_seconds)
        queue = Queue(self.keys.worker_queue(request.worker), connection=self.sync, serializer=JSONSerializer)
        queue.enqueue(
            LOAD_JOB,
            request.model_dump(mode="json"),
            job_id=f"load-{request.claim}",
            job_timeout=timeout + 60,
            ttl=timeout,
            result_ttl=600,
            failure_ttl=24 * 3600,
            description=f"load {request.model}",
        )

    async def waiting(self, model: str, workers: list[WorkerInfo]) -> dict[str, Any] | None:
        """For a job queued for a model no live worker serves: the event that ends it, or None
        while its load is on its way."""
        raw = await self.connection.get(self.keys.load_claim(model))
        if raw is not None:
            claim = LoadRequest.model_validate_json(raw)
            worker = next((w for w in workers if w.name == claim.worker), None)
            if worker is not None and not worker.draining:
                return None  # beating: loading (its record shows how far) or about to
            await self._drop_claim(claim)
            others = [w for w in workers if w.name != claim.worker]
            if worker is not None:
                # Stopping before it ran the load: nothing was lost, the requests wait for another.
                log.info("worker %s is stopping; placing %s elsewhere", claim.worker, model)
                try:
                    await self.place(model, others)
                except OllmError as exc:
                    return _error(str(exc), exc.status, exc.code)
                return None
            message = (
                f"worker {claim.worker} stopped responding (no heartbeat for over {self.lost_after:g}s) while "
                f"loading model {model!r}; the request was abandoned and the load is retried on another worker"
            )
            try:
                await self.place(model, others)
            except OllmError as exc:
                log.warning("could not place %s again: %s", model, exc)
            return _error(message, 503, "worker_lost")
        failed = await self.connection.get(self.keys.load_failed(model))
        if failed is not None:
            text = failed.decode() if isinstance(failed, bytes) else str(failed)
            return _error(text, 503, "model_load_failed")
        try:
            await self.place(model, workers)
        except OllmError as exc:
            return _error(str(exc), exc.status, exc.code)
        return None

    async def _drop_claim(self, claim: LoadRequest) -> None:
        """Delete a lost worker's claim, if no one replaced it meanwhile."""
        key = self.keys.load_claim(claim.model)
        async with self.connection.pipeline(transaction=True) as pipe:
            try:
                await pipe.watch(key)
                raw = await pipe.get(key)
                if raw is None or LoadRequest.model_validate_json(raw).claim != claim.claim:
                    return
                pipe.multi()
                pipe.delete(key)
                await pipe.execute()
            except redis.WatchError:
                return

    def replica_due(self, model: str) -> bool:
        """Whether to look at ``model``'s queue depth now: replicas are on and it has not been
        looked at for a second (the clock starts now)."""
        now = time.monotonic()
        if not self.settings.server.replica_queue_depth or now - self._replica_checked.get(model, 0.0) < 1.0:
            return False
        self._replica_checked[model] = now
        return True

    async def deep(self, model: str) -> bool:
        """Whether ``server.replica_queue_depth`` requests wait in the model's queue."""
        depth = self.settings.server.replica_queue_depth
        return bool(depth) and await self.connection.llen(self.keys.rq_queue_key(model)) >= depth

    async def consider_replica(self, model: str, workers: list[WorkerInfo]) -> None:
        """A second copy of a busy model, when its queue is deep and a worker has room now."""
        if not await self.deep(model):
            return
        try:
            await self.place(model, workers, replica=True)
        except OllmError as exc:
            log.debug("no replica of %s: %s", model, exc)


def _error(message: str, status: int, code: str) -> dict[str, Any]:
    return ErrorEvent(message=message, status=status, code=code).model_dump(mode="json")
