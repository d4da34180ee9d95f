"""The worker's keep-alive sweeper: unloads idle models whose keep-alive ran out, serves the load
requests sent on the residency channel, and reports what the worker holds (the server's /api/ps).

Clients choose the keep-alive (Ollama's ``keep_alive``); the server stores the latest choice per
model under ``Keys.keep_alive`` as ``{"seconds": s | null, "stamp": unique}`` (null = forever).
An unload consumes the value that caused it: the stamp is remembered, and until a client sets a new
one the model is kept loaded (the worker's own default), so a request from an API without keep-alive
that reloads the model does not see it dropped again at once. A pinned model's queue stays
registered after an unload (the heartbeat still lists it as served), so the next request simply
reloads it; a model loaded on demand stops being served here until it is placed again.

Load and unload requests that must take effect now (Ollama's empty prompt, ``keep_alive: 0``) come
on ``Keys.residency_channel``. What each worker process holds is written to ``Keys.loaded``, with a
TTL so a dead worker's entry disappears by itself. One thread does all of this, every ``TICK``
seconds or as soon as something changed; a load it asks for runs on a thread of its own, so the
report goes on while a model loads.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from typing import Any

import redis
from pydantic import ValidationError
from redis.client import PubSub

from ollm.contract import KeepAlive, Keys, LoadedModel, ResidencyMessage
from workers.residency import Residency

log = logging.getLogger(__name__)

TICK = 0.5
# How soon a change (a load, a finished request) reaches the loaded-models report.
_PROMPT = 0.1
# The loaded-models hash outlives a few missed sweeps but not a dead worker for long.
_LOADED_TTL_MS = 15_000


class KeepAliveSweeper:
    def __init__(self, residency: Residency, connection: redis.Redis, keys: Keys) -> None:
        self.residency = residency
        self.connection = connection
        self.keys = keys
        self.loaded_key = keys.loaded(socket.gethostname(), os.getpid())
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="ollm-keep-alive", daemon=True)
        # Planning imports transformers (seconds) and cannot be interrupted: on a thread of its own,
        # which stop() does not wait for, so neither the reports nor a stopping worker wait on it.
        self._planner = threading.Thread(target=self._plan, name="ollm-plan-peaks", daemon=True)

    def start(self) -> None:
        self._thread.start()
        self._planner.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=5)
        try:
            self.connection.delete(self.loaded_key)
        except redis.RedisError as exc:
            log.debug("could not clear %s: %s", self.loaded_key, exc)

    def _run(self) -> None:
        # A Redis outage only pauses the sweeper: it resubscribes when Redis is back.
        pubsub: PubSub | None = None
        next_sweep = 0.0
        while not self._stop.is_set():
            try:
                if pubsub is None:
                    pubsub = self.connection.pubsub(ignore_subscribe_messages=True)
                    pubsub.subscribe(self.keys.residency_channel)
                requests = []
                message = pubsub.get_message(timeout=_PROMPT)
                while message is not None:
                    request = _residency_request(message)
                    if request is not None:
                        requests.append(request)
                    message = pubsub.get_message(timeout=0)
                if requests or self.residency.changed.is_set() or time.monotonic() >= next_sweep:
                    self.residency.changed.clear()
                    self.sweep(requests)
                    next_sweep = time.monotonic() + TICK
            except redis.RedisError as exc:
                log.warning("keep-alive: %s", exc)
                if pubsub is not None:
                    pubsub.close()
                    pubsub = None
                self._stop.wait(1.0)
            except Exception:
                log.exception("keep-alive sweep failed")
                self._stop.wait(TICK)
        if pubsub is not None:
            pubsub.close()

    def _plan(self) -> None:
        while not self._stop.is_set():
            try:
                self.residency.refresh_peaks()
            except Exception:
                log.exception("planning the models' peaks failed")
            self._stop.wait(TICK)

    def sweep(self, requests: list[tuple[str, str]] = []) -> None:  # noqa: B006 (never mutated)
        """Start the loads asked for, unload expired idle models, then publish what is loaded."""
        for model, action in requests:
            if action == "load":
                self.residency.request_load(model)
        keep_alives = self._keep_alives()
        self.residency.expire(keep_alives)
        self._publish(keep_alives)

    def _keep_alives(self) -> dict[int, KeepAlive]:
        """The newest client keep-alive for each resident, over all the names it is served under."""
        names = [(resident, name) for resident in self.residency.held() for name in resident.names]
        if not names:
            return {}
        raw = self.connection.mget([self.keys.keep_alive(name) for _, name in names])
        chosen: dict[int, KeepAlive] = {}
        for (resident, _), value in zip(names, raw, strict=True):
            keep_alive = KeepAlive.parse(value)
            if keep_alive is not None and keep_alive.stamp > getattr(chosen.get(id(resident)), "stamp", ""):
                chosen[id(resident)] = keep_alive
        return chosen

    def _publish(self, keep_alives: dict[int, KeepAlive]) -> None:
        entries = {
            resident.name: LoadedModel(
                names=resident.names,
                size=resident.size,
                loaded_at=resident.loaded_at,
                expires_at=resident.expires_at(keep_alives.get(id(resident))),
                last_used=resident.last_used,
                in_flight=resident.in_flight(),
                pinned=resident.pinned,
            ).model_dump_json()
            for resident in self.residency.held()
            if resident.model is not None
        }
        with self.connection.pipeline() as pipe:
            pipe.delete(self.loaded_key)
            if entries:
                pipe.hset(self.loaded_key, mapping=entries)  # type: ignore[arg-type]
                pipe.pexpire(self.loaded_key, _LOADED_TTL_MS)
            pipe.execute()


def _residency_request(message: dict[str, Any]) -> tuple[str, str] | None:
    try:
        data = ResidencyMessage.model_validate_json(message["data"])
        return data.model, data.action
    except (ValidationError, KeyError, TypeError):
        log.warning("ignoring malformed residency message %r", message.get("data"))
        return None
