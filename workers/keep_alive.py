"""Residency: which models a worker holds in memory, within its budget, and for how long.

Each model a worker serves is wrapped in a ``Resident``: it loads the real engine (or embedder) on
the first request that needs it and counts requests in flight. Models are pinned (loaded at start,
never evicted) or loaded on demand (``Residency.load``, placed by the server's scheduler): a load
that does not fit ``worker.memory_budget`` / ``worker.max_loaded_models`` first evicts the least
recently used idle on-demand model. A ``Residency`` thread sweeps every ``TICK`` seconds: an idle
model whose keep-alive has run out since its last request is closed and dropped. A pinned model's
queue stays registered (the heartbeat still lists it as served), so the next request simply
reloads it; a model loaded on demand stops being served here until it is placed again.

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
from pathlib import Path
from typing import Any, Generic, TypeVar

import redis
from pydantic import ValidationError
from redis.client import PubSub

from ollm.contract import KeepAlive, Keys, LoadedModel, ResidencyMessage
from ollm.engine.base import Engine, EventSink
from ollm.errors import OllmError, ServiceUnavailableError
from ollm.generation import EmbeddingRequest, EmbeddingResult, ErrorEvent, Event, FinalEvent, GenerationRequest
from ollm.settings import Settings
from workers.job import Embedder
from workers.memory import counted_bytes, plan_for, planned_bytes, planned_peaks, resident_bytes

log = logging.getLogger(__name__)

TICK = 0.5
# How soon a change (a load, a finished request) reaches the loaded-models report.
_PROMPT = 0.1
# The loaded-models hash outlives a few missed sweeps but not a dead worker for long.
_LOADED_TTL_MS = 15_000
# How long a keep-alive reload of a pinned model waits for busy on-demand models to make room.
_RELOAD_WAIT = 60.0

M = TypeVar("M")


class Resident(Generic[M]):
    """One served model: the loaded engine or embedder (or None), its names, use and keep-alive."""

    def __init__(
        self, names: list[str], load: Callable[[], M], loaded: M | None, size: int, pinned: bool = True
    ) -> None:
        self.names = names
        self.size = size
        # Pinned: loaded at start (`ollm worker --model`), never evicted, and still served after a
        # keep-alive unload (it reloads on use). A model loaded on demand leaves with its memory.
        self.pinned = pinned
        self._load = load
        # Called before a reload with the bytes it needs, so a budget can make room first.
        self.before_reload: Callable[[Resident[Any]], None] = lambda resident: None
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
                self.before_reload(self)
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

    def in_flight(self) -> int:
        with self._lock:
            return self._in_flight

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


def engine_batch_size(engine: object) -> int:
    """Sequences in an engine's decode batch; engines that do not say (test doubles) count none."""
    size = getattr(engine, "batch_size", None)
    return int(size()) if callable(size) else 0


class Residency:
    """The residents of one worker process, its memory budget, the sweeper thread and the
    residency listener.

    Loads on demand (``load``) fit the budget: the least recently used idle model that was itself
    loaded on demand is evicted until the new one fits (``make_room``); a pinned model or one with
    requests running or queued never is.
    """

    def __init__(
        self,
        connection: redis.Redis,
        keys: Keys,
        residents: list[Resident[Any]],
        budget: int = 0,
        max_loaded: int = 0,
        settings: Settings | None = None,
    ) -> None:
        self.connection = connection
        self.keys = keys
        self.settings = settings
        self.budget = budget
        self.max_loaded = max_loaded
        self.residents: list[Resident[Any]] = []
        self.engines: dict[str, Engine] = {}
        self.embedders: dict[str, Embedder] = {}
        self.loads = 0
        self.loaded_key = keys.loaded(socket.gethostname(), os.getpid())
        # Told the names a model is served under when it arrives (True) or leaves (False): the
        # worker listens on their queues and beats at once.
        self.on_served: Callable[[list[str], bool], None] = lambda names, served: None
        # Loads, evictions and keep-alive unloads one at a time: the budget is checked and spent
        # under this lock.
        self._memory = threading.RLock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="ollm-keep-alive", daemon=True)
        self._dirty = threading.Event()
        # The planned peak of each model under models_dir (see ``planned_peaks``), re-planned when
        # the directory changes (a pull, a removal).
        self.peaks: dict[str, int] = {}
        self._peaks_of: tuple[tuple[str, int, int], ...] | None = None
        for resident in residents:
            self.add(resident)

    def add(self, resident: Resident[Any]) -> None:
        resident.on_change = self.publish_now
        resident.before_reload = self._before_reload
        self.residents.append(resident)

    # ---- memory ------------------------------------------------------------------------------

    def used(self) -> int:
        return sum(r.size for r in self.residents if r.model is not None)

    def holding(self, model: str) -> Resident[Any] | None:
        return next((r for r in self.residents if model in r.names), None)

    def status(self) -> dict[str, str | int]:
        """The registration fields that change as models come and go (see ``WorkerInfo``)."""
        with self._memory:
            return {
                **self._sequences(),
                "models": json.dumps(sorted({name for r in self.residents for name in r.names})),
                "pinned": json.dumps(sorted({name for r in self.residents if r.pinned for name in r.names})),
                "memory_budget": self.budget,
                "memory_used": self.used(),
                "max_loaded_models": self.max_loaded,
                "loads": self.loads,
                "peaks": json.dumps(self.peaks, sort_keys=True),
            }

    def _sequences(self) -> dict[str, int]:
        """Sequences the loaded engines run now, for the metrics (``ollm_worker_running_sequences``)."""
        engines = {id(engine): engine for engine in self.engines.values()}.values()
        return {
            "running": sum(engine.active() for engine in engines),
            "batch_size": sum(engine_batch_size(engine) for engine in engines),
        }

    def make_room(self, size: int, name: str, deadline: float, keep: Resident[Any] | None = None) -> None:
        """Evict idle on-demand models, least recently used first, until ``size`` more bytes and
        one more model fit. Waits (until ``deadline``, monotonic) while the only candidates are
        busy; raises ServiceUnavailableError when the model cannot fit at all or in time."""
        pinned = sum(r.size for r in self.residents if r.pinned and r.model is not None and r is not keep)
        if self.budget and size + pinned > self.budget:
            raise ServiceUnavailableError(_too_large(name, size, self.budget, pinned))
        while True:
            with self._memory:
                loaded = [r for r in self.residents if r.model is not None and r is not keep]
                fits = not self.budget or self.used() + size <= self.budget
                if fits and (not self.max_loaded or len(loaded) < self.max_loaded):
                    return
                idle = [r for r in loaded if not r.pinned and not r.busy() and not self._waiting(r)]
                if idle:
                    victim = min(idle, key=lambda r: r.last_used)
                    log.info("evicting %s (%d bytes, idle) to make room for %s", victim.name, victim.size, name)
                    self._drop(victim, None)
                    continue
            if time.monotonic() > deadline:
                raise ServiceUnavailableError(
                    f"no room for model {name!r} ({_gib(size)}) on this worker: its memory budget "
                    f"({_gib(self.budget)}) is taken by models with requests running"
                )
            time.sleep(0.1)

    def _waiting(self, resident: Resident[Any]) -> bool:
        """Whether requests wait in the model's queue: it would be reloaded as soon as it left."""
        try:
            with self.connection.pipeline(transaction=False) as pipe:
                for name in resident.names:
                    pipe.llen(self.keys.rq_queue_key(name))
                return any(pipe.execute())
        except redis.RedisError:
            return True

    def _before_reload(self, resident: Resident[Any]) -> None:
        self.make_room(resident.size, resident.name, time.monotonic() + _RELOAD_WAIT, keep=resident)

    def _drop(self, resident: Resident[Any], consumed: str | None) -> bool:
        """Unload a resident; one loaded on demand also stops being served here."""
        if not resident.unload(consumed):
            return False
        if not resident.pinned:
            self.residents.remove(resident)
            for name in resident.names:
                self.engines.pop(name, None)
                self.embedders.pop(name, None)
            self.on_served(resident.names, False)
        self.publish_now()
        return True

    # ---- loading on demand ---------------------------------------------------------------------

    def load(self, model: str, deadline: float) -> tuple[Resident[Any], bool]:
        """Have ``model`` loaded here: (its resident, whether this call loaded it). Never a second
        copy: a model already held (under any of its names) is only reloaded if it was unloaded."""
        from workers.engines import load_models

        assert self.settings is not None, "loading on demand needs the worker's settings"
        settings = self.settings
        with self._memory:
            held = self.holding(model)
            if held is not None:
                if held.model is None:
                    held.acquire()
                    held.release()
                return held, False
            plan = plan_for(model, settings)
            held = self.holding(plan.resolved_reference) or self._holding_files(plan.path)
            if held is not None:
                # The same model under another name (an alias and its directory): serve that name too.
                self._also_serve(held, model)
        if held is not None:
            self.on_served([model], True)
            self.publish_now()
            return held, False
        with self._memory:
            estimate = planned_bytes(plan)
            self.make_room(estimate, model, deadline)
            started = time.perf_counter()
            log.info("loading %s on demand (about %s)", model, _gib(estimate))
            engines, embedders = load_models([model], self.settings)
            loaded: Any = (engines or embedders)[model]
            kind = "engine" if engines else "embedder"
            names = list(dict.fromkeys([model, plan.resolved_reference]))

            def reload(first: str = model, kind: str = kind) -> Any:
                loaded_engines, loaded_embedders = load_models([first], self.settings)  # type: ignore[arg-type]
                return (loaded_engines if kind == "engine" else loaded_embedders)[first]

            size = counted_bytes(plan, resident_bytes(loaded))
            resident: Resident[Any] = Resident(names, reload, loaded, size, pinned=False)
            self.add(resident)
            self._serve(resident, kind)
            self.loads += 1
            log.info("loaded %s in %.1fs (%s)", model, time.perf_counter() - started, _gib(resident.size))
        self.on_served(names, True)
        self.publish_now()
        return resident, True

    def _holding_files(self, path: Path | None) -> Resident[Any] | None:
        """A resident loaded from the directory ``path`` under another name, if any."""
        from ollm.plan import plan_model

        assert self.settings is not None
        if path is None:
            return None
        for resident in self.residents:
            try:
                other = plan_model(resident.name, self.settings.runtime).path
            except OllmError:
                continue
            if other is not None and other.resolve() == path.resolve():
                return resident
        return None

    def _also_serve(self, resident: Resident[Any], name: str) -> None:
        resident.names.append(name)
        if resident.name in self.engines:
            self.engines[name] = self.engines[resident.name]
        if resident.name in self.embedders:
            self.embedders[name] = self.embedders[resident.name]

    def _serve(self, resident: Resident[Any], kind: str) -> None:
        wrapper: Any = ResidentEngine(resident) if kind == "engine" else ResidentEmbedder(resident)
        target: dict[str, Any] = self.engines if kind == "engine" else self.embedders
        target.update(dict.fromkeys(resident.names, wrapper))

    @classmethod
    def around(
        cls,
        engines: Mapping[str, Engine],
        embedders: Mapping[str, Embedder],
        settings: Settings,
        connection: redis.Redis,
        keys: Keys,
        budget: int = 0,
    ) -> Residency:
        """Wrap what ``workers.engines.load_models`` loaded at start (pinned); reloads go through
        it again."""
        from workers.engines import load_models

        residency = cls(connection, keys, [], budget, settings.worker.max_loaded_models, settings)
        for kind, models in (("engine", engines), ("embedder", embedders)):
            groups: dict[int, list[str]] = {}
            for name, model in models.items():
                groups.setdefault(id(model), []).append(name)
            for names in groups.values():
                first = names[0]

                def load(first: str = first, kind: str = kind) -> Any:
                    loaded_engines, loaded_embedders = load_models([first], settings)
                    return (loaded_engines if kind == "engine" else loaded_embedders)[first]

                resident: Resident[Any] = Resident(names, load, models[first], _size_of(first, models[first], settings))
                residency.add(resident)
                residency.loads += 1
                residency._serve(resident, kind)
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
                self.refresh_peaks()
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

    def refresh_peaks(self) -> None:
        """Plan the models under models_dir again if they changed since the last time.

        On the sweeper thread, first thing: planning imports transformers (a second or two), which
        must not delay the worker's registration. Until then the scheduler counts weights here."""
        if self.settings is None or not self.settings.worker.on_demand:
            # Only a worker that loads on demand is ever sized by the scheduler.
            return
        models = _models_signature(self.settings.runtime.resolved_models_dir())
        if models == self._peaks_of:
            return
        self._peaks_of = models
        self.peaks = planned_peaks(self.settings)

    def sweep(self, requests: list[tuple[str, str]] = []) -> None:  # noqa: B006 (never mutated)
        """Serve load requests, unload expired idle models, then publish what is loaded."""
        for model, action in requests:
            for resident in list(self.residents):
                if model in resident.names and action == "load":
                    try:
                        resident.acquire()
                        resident.release()
                    except Exception:
                        log.exception("could not load %s", resident.name)
        keep_alives = self._keep_alives()
        now = time.time()
        with self._memory:
            for resident in list(self.residents):
                keep_alive = keep_alives.get(id(resident))
                expires = resident.expires_at(keep_alive)
                if resident.model is not None and expires is not None and expires <= now:
                    self._drop(resident, keep_alive.stamp if keep_alive else None)
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
            resident.name: LoadedModel(
                names=resident.names,
                size=resident.size,
                loaded_at=resident.loaded_at,
                expires_at=resident.expires_at(keep_alives.get(id(resident))),
                last_used=resident.last_used,
                in_flight=resident.in_flight(),
                pinned=resident.pinned,
            ).model_dump_json()
            for resident in self.residents
            if resident.model is not None
        }
        with self.connection.pipeline() as pipe:
            pipe.delete(self.loaded_key)
            if entries:
                pipe.hset(self.loaded_key, mapping=entries)  # type: ignore[arg-type]
                pipe.pexpire(self.loaded_key, _LOADED_TTL_MS)
            pipe.execute()


def _size_of(reference: str, model: Any, settings: Settings) -> int:
    """What a model loaded at start counts against the budget (see ``counted_bytes``)."""
    measured = resident_bytes(model)
    try:
        plan = plan_for(reference, settings)
    except OllmError as exc:  # a local path that moved since: what it holds is all there is to count
        log.info("cannot plan %s (%s); counting what it holds", reference, exc)
        return measured or 0
    return counted_bytes(plan, measured)


def _models_signature(models_dir: Path) -> tuple[tuple[str, int, int], ...]:
    """Which model directories there are, and which copy of each (a re-pull replaces its files)."""
    found = []
    try:
        for path in models_dir.iterdir():
            try:
                config = (path / "config.json").stat()
            except OSError:
                continue
            found.append((path.name, config.st_ino, config.st_mtime_ns))
    except OSError:
        return ()
    return tuple(sorted(found))


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
        data = ResidencyMessage.model_validate_json(message["data"])
        return data.model, data.action
    except (ValidationError, KeyError, TypeError):
        log.warning("ignoring malformed residency message %r", message.get("data"))
        return None


def _gib(size: int) -> str:
    return f"{size / 2**30:.2f} GiB"


def _too_large(name: str, size: int, budget: int, pinned: int) -> str:
    held = f", {_gib(pinned)} of it held by pinned models" if pinned else ""
    return (
        f"model {name!r} needs about {_gib(size)} but this worker's memory budget is {_gib(budget)}{held}; "
        "raise worker.memory_budget or run a worker with more memory"
    )
