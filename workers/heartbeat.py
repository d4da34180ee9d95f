"""Worker registration: each worker refreshes a short-lived key; readers see who serves what.

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
import redis.asyncio
from pydantic import BaseModel, Field

from workers.keys import Keys

log = logging.getLogger(__name__)


class WorkerInfo(BaseModel):
    name: str
    host: str
    pid: int
    models: list[str]
    in_flight: int = 0
    max_batch: int = 1
    started_at: float = 0.0
    age_seconds: float = Field(0.0, description="Seconds since the last heartbeat.")


def ttl_ms_for(heartbeat_seconds: float) -> int:
    # Long enough that readers, not Redis expiry, decide liveness with their own bound; short
    # enough that a dead worker's key disappears by itself.
    return int(max(30.0, 10 * heartbeat_seconds) * 1000)


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
    ) -> None:
        self.connection = connection
        self.keys = keys
        self.name = name
        self.interval = interval
        self.ttl_ms = ttl_ms_for(interval)
        self._in_flight = in_flight
        self._static: dict[str, str | int | float] = {
            "name": name,
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "models": json.dumps(models),
            "max_batch": max_batch,
            "started_at": time.time(),
            "ttl_ms": self.ttl_ms,
        }
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="ollm-heartbeat", daemon=True)

    def start(self) -> None:
        self.beat()
        self._thread.start()

    def beat(self) -> None:
        key = self.keys.worker(self.name)
        fields: dict[Any, Any] = {**self._static, "in_flight": self._in_flight()}
        with self.connection.pipeline() as pipe:
            pipe.hset(key, mapping=fields)
            pipe.pexpire(key, self.ttl_ms)
            pipe.sadd(self.keys.workers, self.name)
            pipe.execute()

    def drain(self) -> None:
        """Advertise no models but keep beating: no new requests come here, while the ones still
        running are not mistaken for abandoned."""
        self._static["models"] = json.dumps([])
        try:
            self.beat()
        except redis.RedisError as exc:
            log.warning("could not announce draining: %s", exc)

    def stop(self) -> None:
        """Stop beating and deregister."""
        self._stop.set()
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
        while not self._stop.wait(self.interval):
            try:
                self.beat()
            except redis.RedisError as exc:
                # Redis may come back; keep trying rather than dying with the worker still up.
                log.warning("heartbeat failed: %s", exc)


async def live_workers(connection: redis.asyncio.Redis, keys: Keys, lost_after: float) -> list[WorkerInfo]:
    """Workers whose last heartbeat is at most ``lost_after`` seconds old."""
    names = sorted(_text(n) for n in await connection.smembers(keys.workers))
    if not names:
        return []
    async with connection.pipeline(transaction=False) as pipe:
        for name in names:
            pipe.hgetall(keys.worker(name))
            pipe.pttl(keys.worker(name))
        raw = await pipe.execute()
    live: list[WorkerInfo] = []
    gone: list[str] = []
    for name, data, pttl in zip(names, raw[::2], raw[1::2], strict=True):
        if not data or pttl < 0:
            gone.append(name)
            continue
        info = _parse(data, pttl)
        if info.age_seconds <= lost_after:
            live.append(info)
    if gone:
        await connection.srem(keys.workers, *gone)
    return live


async def worker_age(connection: redis.asyncio.Redis, keys: Keys, name: str) -> float | None:
    """Seconds since the named worker's last heartbeat; None once its key has expired or was removed."""
    async with connection.pipeline(transaction=False) as pipe:
        pipe.hget(keys.worker(name), "ttl_ms")
        pipe.pttl(keys.worker(name))
        ttl_ms, pttl = await pipe.execute()
    if ttl_ms is None or pttl < 0:
        return None
    return max(0.0, (int(ttl_ms) - pttl) / 1000)


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _parse(data: dict[Any, Any], pttl: int) -> WorkerInfo:
    fields = {_text(k): _text(v) for k, v in data.items()}
    return WorkerInfo(
        name=fields["name"],
        host=fields.get("host", "?"),
        pid=int(fields.get("pid", 0)),
        models=json.loads(fields.get("models", "[]")),
        in_flight=int(fields.get("in_flight", 0)),
        max_batch=int(fields.get("max_batch", 1)),
        started_at=float(fields.get("started_at", 0)),
        age_seconds=max(0.0, (int(fields.get("ttl_ms", pttl)) - pttl) / 1000),
    )
