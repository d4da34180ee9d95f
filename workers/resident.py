"""One model a worker serves: the loaded engine or embedder (or None while unloaded), its names,
the requests using it and its keep-alive state. ``Residency`` (workers/residency.py) owns them all.

A resident never loads by itself: ``acquire`` on an unloaded model calls ``reload``, which the
residency sets so the load fits the worker's budget and runs one at a time. The resident's own
lock guards only its fields and is never held while loading or closing a model (see the lock order
in workers/residency.py).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any, Generic, TypeVar

from ollm.contract import KeepAlive
from ollm.engine.base import Engine, EventSink
from ollm.generation import EmbeddingRequest, EmbeddingResult, ErrorEvent, Event, FinalEvent, GenerationRequest
from workers.job import Embedder

M = TypeVar("M")


class Resident(Generic[M]):
    def __init__(
        self, names: list[str], load: Callable[[], M], loaded: M | None, size: int, pinned: bool = True
    ) -> None:
        self.names = names
        self.size = size
        # Pinned: loaded at start (`ollm worker --model`), never evicted, and still served after a
        # keep-alive unload (it reloads on use). A model loaded on demand leaves with its memory.
        self.pinned = pinned
        # Builds the model from its files; only ``reload`` calls it.
        self.load = load
        # Loads the model again within the worker's budget and returns it (set by the residency).
        self.reload: Callable[[Resident[M]], M] = lambda resident: resident.load()
        self.model: M | None = loaded
        self._lock = threading.Lock()
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
        """The loaded model, loading it first if needed; the caller must ``release()`` later.
        Counted in flight before any reload, so the model cannot be evicted between its load and
        its use."""
        with self._lock:
            self._in_flight += 1
            model = self.model
        if model is None:
            try:
                model = self.reload(self)
            except BaseException:
                self.release()
                raise
        self.on_change()
        return model

    def set_loaded(self, model: M) -> None:
        """Set by the residency's reload, under no lock of the residency's."""
        with self._lock:
            self.model = model
            self.loaded_at = time.time()

    def release(self) -> None:
        with self._lock:
            self._in_flight = max(0, self._in_flight - 1)
            self.last_used = time.time()
        self.on_change()

    def in_flight(self) -> int:
        with self._lock:
            return self._in_flight

    def busy(self) -> bool:
        with self._lock:
            if self._in_flight:
                return True
            active = getattr(self.model, "active", None)
            return bool(active()) if callable(active) else False

    def detach(self, consumed: str | None) -> M | None:
        """Take the model away if nothing is using it (the caller closes it, outside any lock);
        None when it is unloaded already or busy."""
        with self._lock:
            if self.model is None or self._in_flight:
                return None
            active = getattr(self.model, "active", None)
            if callable(active) and active():
                return None
            model, self.model = self.model, None
            self.consumed = consumed
            return model

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

    def batch_size(self) -> int:
        return engine_batch_size(self.resident.model)

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


def engine_batch_size(engine: Any) -> int:
    """Sequences in an engine's decode batch; engines that do not say (test doubles) count none."""
    size = getattr(engine, "batch_size", None)
    return int(size()) if callable(size) else 0
