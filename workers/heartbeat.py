"""Worker registration: each worker refreshes a short-lived key; readers see who serves what.

The record and its readers are part of the server/worker contract (``ollm.contract``); this is
the writer.

A worker writes ``{ns}:worker:{name}`` (a hash: host, pid, models, in-flight count) every
``worker.heartbeat_seconds`` and sets its TTL in milliseconds. A reader computes the age of the
last beat from Redis' own clock (``ttl_ms - PTTL``), so hosts with skewed clocks agree, and calls
a worker live while that age is within ``server.worker_lost_seconds``.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
from collections.abc import Callable
from typing import Any

import redis

from ollm.contract import Keys, WorkerInfo, live_workers, ttl_ms_for, worker_age

__all__ = ["Heartbeat", "WorkerInfo", "live_workers", "worker_age"]

log = logging.getLogger(__name__)


class Heartbeat:
    """Refreshes one worker's registration from a daemon thread until stopped."""

    def __init__(
        self,
        connection: redis.Redis,
        keys: Keys,
        name: str,
        models: list[str],
        max_batch: int,
        interval: float,
        in_flight: Callable[[], int],
        status: Callable[[], dict[str, str | int]] | None = None,
    ) -> None:
        self.connection = connection
        self.keys = keys
        self.name = name
        self.interval = interval
        self.ttl_ms = ttl_ms_for(interval)
        self._in_flight = in_flight
        # What changes as models load and leave: models, memory used, loaded count (see WorkerInfo).
        self._status = status or (lambda: {})
        self._static: dict[str, str | int | float] = {
            "name": name,
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "models": json.dumps(models),
            "max_batch": max_batch,
            "started_at": time.time(),
            "ttl_ms": self.ttl_ms,
        }
        self._draining = False
        self._stop = threading.Event()
        self._wake = threading.Event()
        # One beat at a time: a beat reads the status, then writes it; two interleaved (the thread's
        # and a load's announcement) could write the older status last and hide the load.
        self._beating = threading.Lock()
        self._thread = threading.Thread(target=self._run, name="ollm-heartbeat", daemon=True)

    def start(self) -> None:
        self.beat()
        self._thread.start()

    def beat(self) -> None:
        with self._beating:
            key = self.keys.worker(self.name)
            fields: dict[Any, Any] = {**self._static, **self._status(), "in_flight": self._in_flight()}
            fields["draining"] = int(self._draining)
            if self._draining:
                fields["models"] = json.dumps([])
            with self.connection.pipeline() as pipe:
                pipe.hset(key, mapping=fields)
                pipe.pexpire(key, self.ttl_ms)
                pipe.sadd(self.keys.workers, self.name)
                pipe.execute()

    def drain(self) -> None:
        """Advertise no models but keep beating: no new requests come here, while the ones still
        running are not mistaken for abandoned."""
        self._draining = True
        try:
            self.beat()
        except redis.RedisError as exc:
            log.warning("could not announce draining: %s", exc)

    def announce_drain(self) -> None:
        """``drain`` from a signal handler: it only sets flags (Redis I/O there could deadlock on a
        connection the interrupted code holds); the heartbeat thread beats at once."""
        self._draining = True
        self._wake.set()

    def stop(self) -> None:
        """Stop beating and deregister."""
        self._stop.set()
        self._wake.set()
        if self._thread.is_alive():
            self._thread.join(timeout=self.interval + 1)
        try:
            with self.connection.pipeline() as pipe:
                pipe.delete(self.keys.worker(self.name))
                pipe.srem(self.keys.workers, self.name)
                pipe.execute()
        except redis.RedisError as exc:
            log.warning("could not deregister worker %s: %s", self.name, exc)

    def _run(self) -> None:
        while True:
            self._wake.wait(self.interval)
            self._wake.clear()
            if self._stop.is_set():
                return
            try:
                self.beat()
            except redis.RedisError as exc:
                # Redis may come back; keep trying rather than dying with the worker still up.
                log.warning("heartbeat failed: %s", exc)
