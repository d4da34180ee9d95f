"""Keep-alive: a worker's models leave memory when idle past their keep-alive and come back on use.

Each model a worker serves is wrapped in a ``Resident``: it loads the real engine (or embedder) on
the first request that needs it and counts requests in flight. A ``Residency`` thread sweeps every
``TICK`` seconds: an idle model whose keep-alive has run out since its last request is closed and
dropped. Its queue stays registered (the heartbeat still lists the model as served), so the next
request simply reloads it.

Clients choose the keep-alive (Ollama's ``keep_alive``); the server stores the latest choice per
model under ``Keys.keep_alive`` as ``{"seconds": s | null, "stamp": unique}`` (null = forever).
An unload consumes the value that caused it: the stamp is remembered, and until a client sets a new
one the model is kept loaded (the worker's own default), so a request from an API without keep-alive
that reloads the model does not see it dropped again at once.

Load and unload requests that must take effect now (Ollama's empty prompt, ``keep_alive: 0``) come
on ``Keys.residency_channel``. What each worker process holds is written to ``Keys.loaded`` (the
server's ``/api/ps``), with a TTL so a dead worker's entry disappears by itself.
"""

from __future__ import annotations

import gc
import json
import logging
import os
import socket
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import redis
from redis.client import PubSub

from ollm.engine.base import Engine, EventSink
from ollm.generation import EmbeddingRequest, EmbeddingResult, ErrorEvent, Event, FinalEvent, GenerationRequest
from ollm.settings import Settings
from workers.job import Embedder
from workers.keys import Keys

log = logging.getLogger(__name__)

TICK = 0.5
# How soon a change (a load, a finished request) reaches the loaded-models report.
_PROMPT = 0.1
# The loaded-models hash outlives a few missed sweeps but not a dead worker for long.
_LOADED_TTL_MS = 15_000

M = TypeVar("M")


@dataclass(frozen=True)
class KeepAlive:
    """One client choice: ``seconds`` None keeps the model loaded forever."""

    seconds: float | None
    stamp: str

    @classmethod
    def parse(cls, raw: bytes | str | None) -> KeepAlive | None:
        if raw is None:
            return None
        try:
            data = json.loads(raw)
            seconds = data.get("seconds")
            return cls(None if seconds is None else float(seconds), str(data.get("stamp", "")))
        except (ValueError, TypeError, AttributeError):
            return None

    def dumps(self) -> str:
        return json.dumps({"seconds": self.seconds, "stamp": self.stamp})


class Resident(Generic[M]):
    """One served model: the loaded engine or embedder (or None), its names, use and keep-alive."""

    def __init__(self, names: list[str], load: Callable[[], M], loaded: M | None, size: int) -> None:
        self.names = names
        self.size = size
        self._load = load
        self.model: M | None = loaded
        self._lock = threading.RLock()
        self._in_flight = 0
        self.last_used = time.time()
        self.loaded_at = time.time() if loaded is not None else 0.0
        # The stamp of the keep-alive that last unloaded this model: it no longer applies.
        self.consumed: str | None = None
        # Called after a load and after each request, so /api/ps does not wait for the next sweep.
        self.on_change: Callable[[], None] = lambda: None

    @property
    def name(self) -> str:
        return self.names[0]

    def acquire(self) -> M:
        """The loaded model, loading it first if needed; the caller must ``release()`` later."""
        with self._lock:
            if self.model is None:
                started = time.perf_counter()
                log.info("loading %s again (it was unloaded after its keep-alive)", self.name)
                self.model = self._load()
                self.loaded_at = time.time()
                log.info("loaded %s in %.1fs", self.name, time.perf_counter() - started)
                self._in_flight += 1
                model = self.model
            else:
                self._in_flight += 1
                return self.model
        self.on_change()
        return model

    def release(self) -> None:
        with self._lock:
            self._in_flight = max(0, self._in_flight - 1)
            self.last_used = time.time()
        self.on_change()

    def busy(self) -> bool:
        with self._lock:
            if self._in_flight:
                return True
            active = getattr(self.model, "active", None)
            return bool(active()) if callable(active) else False

    def unload(self, consumed: str | None) -> bool:
        """Close and drop the model if nothing is using it; returns whether it was unloaded."""
        with self._lock:
            if self.model is None or self.busy():
                return False
            model, self.model = self.model, None
            self.consumed = consumed
            close = getattr(model, "close", None)
        if callable(close):
            close()
        del model
        _free_memory()
        log.info("unloaded %s", self.name)
        return True

    def expires_at(self, keep_alive: KeepAlive | None) -> float | None:
        """When this model will be unloaded (epoch seconds); None while it is kept forever."""
        seconds = self.keep_alive_seconds(keep_alive)
        if seconds is None:
            return None
        return (time.time() if self.busy() else self.last_used) + seconds

    def keep_alive_seconds(self, keep_alive: KeepAlive | None) -> float | None:
        if keep_alive is None or keep_alive.stamp == self.consumed:
            return None
        return keep_alive.seconds


class ResidentEngine:
    """An Engine that loads its model on demand and tracks requests in flight for the keep-alive."""

    def __init__(self, resident: Resident[Engine]) -> None:
        self.resident = resident
        assert resident.model is not None, "a resident engine starts loaded"
        self.info = resident.model.info

    def submit(self, request: GenerationRequest, sink: EventSink) -> None:
        engine = self.resident.acquire()
        self.info = engine.info

        def relay(event: Event) -> None:
            if isinstance(event, FinalEvent | ErrorEvent):
                self.resident.release()
            sink(event)

        try:
            engine.submit(request, relay)
        except BaseException:
            self.resident.release()
            raise

    def cancel(self, request_id: str) -> None:
        engine = self.resident.model
        if engine is not None:
            engine.cancel(request_id)

    def ready(self) -> bool:
        return self.resident.model is not None

    def active(self) -> int:
        engine = self.resident.model
        return engine.active() if engine is not None else 0

    def close(self) -> None:
        engine, self.resident.model = self.resident.model, None
        if engine is not None:
            engine.close()


class ResidentEmbedder:
    def __init__(self, resident: Resident[Embedder]) -> None:
        self.resident = resident

    def embed(self, request: EmbeddingRequest) -> EmbeddingResult:
        embedder = self.resident.acquire()
        try:
            return embedder.embed(request)
        finally:
            self.resident.release()


class Residency:
    """The residents of one worker process, their sweeper thread and the residency listener."""

    def __init__(self, connection: redis.Redis, keys: Keys, residents: list[Resident[Any]]) -> None:
        self.connection = connection
        self.keys = keys
        self.residents: list[Resident[Any]] = []
        self.engines: dict[str, Engine] = {}
        self.embedders: dict[str, Embedder] = {}
        self.loaded_key = keys.loaded(socket.gethostname(), os.getpid())
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="ollm-keep-alive", daemon=True)
        self._dirty = threading.Event()
        for resident in residents:
            self.add(resident)

    def add(self, resident: Resident[Any]) -> None:
        resident.on_change = self.publish_now
        self.residents.append(resident)

    @classmethod
    def around(
        cls,
        engines: Mapping[str, Engine],
        embedders: Mapping[str, Embedder],
        settings: Settings,
        connection: redis.Redis,
        keys: Keys,
    ) -> Residency:
        """Wrap what ``workers.engines.load_models`` loaded; reloads go through it again."""
        from workers.engines import load_models

        residency = cls(connection, keys, [])
        for kind, models in (("engine", engines), ("embedder", embedders)):
            groups: dict[int, list[str]] = {}
            for name, model in models.items():
                groups.setdefault(id(model), []).append(name)
            for names in groups.values():
                first = names[0]

                def load(first: str = first, kind: str = kind) -> Any:
                    loaded_engines, loaded_embedders = load_models([first], settings)
                    return (loaded_engines if kind == "engine" else loaded_embedders)[first]

                resident: Resident[Any] = Resident(names, load, models[first], _size_of(first, settings))
                residency.add(resident)
                wrapper: Any = ResidentEngine(resident) if kind == "engine" else ResidentEmbedder(resident)
                target: dict[str, Any] = residency.engines if kind == "engine" else residency.embedders
                target.update(dict.fromkeys(names, wrapper))
        return residency

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=5)
        try:
            self.connection.delete(self.loaded_key)
        except redis.RedisError as exc:
            log.debug("could not clear %s: %s", self.loaded_key, exc)

    def _run(self) -> None:
        # One thread reads the residency channel and sweeps, so a load (seconds long) never races
        # an unload of the same model. A Redis outage only pauses it: it resubscribes when back.
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
                if requests or self._dirty.is_set() or time.monotonic() >= next_sweep:
                    self._dirty.clear()
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

    def sweep(self, requests: list[tuple[str, str]] = []) -> None:  # noqa: B006 (never mutated)
        """Serve load requests, unload expired idle models, then publish what is loaded."""
        for model, action in requests:
            for resident in self.residents:
                if model in resident.names and action == "load":
                    try:
                        resident.acquire()
                        resident.release()
                    except Exception:
                        log.exception("could not load %s", resident.name)
        keep_alives = self._keep_alives()
        now = time.time()
        for resident in self.residents:
            keep_alive = keep_alives.get(id(resident))
            expires = resident.expires_at(keep_alive)
            if resident.model is not None and expires is not None and expires <= now:
                resident.unload(keep_alive.stamp if keep_alive else None)
        self._publish(keep_alives)

    def publish_now(self) -> None:
        """Have the sweeper report within ``_PROMPT`` seconds (a load, a request ended). It may be
        called from an engine's own thread, so it only sets a flag: no Redis I/O there."""
        self._dirty.set()

    def _keep_alives(self) -> dict[int, KeepAlive]:
        """The newest client keep-alive for each resident, over all the names it is served under."""
        names = [(resident, name) for resident in self.residents for name in resident.names]
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
            resident.name: json.dumps(
                {
                    "names": resident.names,
                    "size": resident.size,
                    "loaded_at": resident.loaded_at,
                    "expires_at": resident.expires_at(keep_alives.get(id(resident))),
                }
            )
            for resident in self.residents
            if resident.model is not None
        }
        with self.connection.pipeline() as pipe:
            pipe.delete(self.loaded_key)
            if entries:
                pipe.hset(self.loaded_key, mapping=entries)  # type: ignore[arg-type]
                pipe.pexpire(self.loaded_key, _LOADED_TTL_MS)
            pipe.execute()


def _size_of(reference: str, settings: Settings) -> int:
    """Bytes of the model's directory (the manifest's count): what a loaded copy roughly takes."""
    from ollm import catalogue

    try:
        path = catalogue.materialized_path(reference, settings.runtime)
    except Exception:  # echo, local paths that moved: size unknown is not an error
        return 0
    if path is None:
        return 0
    return catalogue.model_size(path, catalogue.read_manifest(path))


def _free_memory() -> None:
    gc.collect()
    try:
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    except Exception as exc:  # freeing is best effort; the weights are already unreferenced
        log.debug("could not empty the CUDA cache: %s", exc)


def _residency_request(message: dict[str, Any]) -> tuple[str, str] | None:
    try:
        data = json.loads(message["data"])
        return str(data["model"]), str(data["action"])
    except (ValueError, KeyError, TypeError):
        log.warning("ignoring malformed residency message %r", message.get("data"))
        return None
