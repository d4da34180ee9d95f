"""Loads on demand, the worker's half of the scheduler (server/scheduler.py is the other half).

The server places a load on one worker: it claims ``Keys.load_claim(model)`` (SET NX) and
enqueues ``workers.job.load`` on that worker's own queue. The worker loads the model within its
memory budget (``Residency.load``), starts listening on the model's queue, announces it, and only
then gives the claim up, so that requests arriving meanwhile see the load in progress and wait
in the model's queue. A failed load is recorded under ``Keys.load_failed(model)`` for the
requests waiting on it.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import redis

from ollm.contract import Keys, LoadRequest
from ollm.errors import OllmError
from workers.residency import Residency

log = logging.getLogger(__name__)

# Waiting requests read why a load failed for this long.
_FAILURE_TTL = 30


class OnDemandLoader:
    def __init__(self, residency: Residency, connection: redis.Redis, keys: Keys, wait_seconds: float) -> None:
        self.residency = residency
        self.connection = connection
        self.keys = keys
        # How long a load may wait for busy models to finish before room is made.
        self.wait_seconds = wait_seconds

    def __call__(self, request: LoadRequest) -> dict[str, Any]:
        try:
            resident, loaded = self.residency.load(request.model, time.monotonic() + self.wait_seconds)
        except BaseException as exc:
            message = str(exc) if isinstance(exc, OllmError) else f"loading {request.model!r} failed: {exc}"
            try:
                self.connection.set(self.keys.load_failed(request.model), message, ex=_FAILURE_TTL)
            finally:
                release_claim(self.connection, self.keys, request)
            raise
        release_claim(self.connection, self.keys, request)
        return {"model": request.model, "names": resident.names, "size": resident.size, "loaded": loaded}


def release_claim(connection: redis.Redis, keys: Keys, request: LoadRequest) -> None:
    """Delete the model's load claim if it is still this placement's (a server may have given a
    lost claim to another worker meanwhile)."""
    key = keys.load_claim(request.model)
    with connection.pipeline() as pipe:
        try:
            pipe.watch(key)
            raw = pipe.get(key)
            if raw is None or LoadRequest.model_validate_json(raw).claim != request.claim:
                return
            pipe.multi()
            pipe.delete(key)
            pipe.execute()
        except redis.WatchError:
            log.debug("load claim of %s changed while releasing it", request.model)
