"""A worker's residency manager: the models it holds, its memory budget, and every load.

Each model a worker serves is a ``Resident`` (workers/resident.py). Models are pinned (loaded at
start, never evicted) or loaded on demand (``load``, placed by the server's scheduler). A load
that does not fit ``worker.memory_budget`` / ``worker.max_loaded_models`` first evicts the least
recently used idle on-demand model: one with no request running and none waiting in its queues,
interactive or Batch API (a model with waiting work would only be placed again at once).

A load first reserves its planned peak (counted as used, so the registration shows it and the
scheduler places nothing else in that room), then reads the model with no lock of the
heartbeat's held, and reports its progress (``LoadProgress``: bytes of weights in place) in the
registration while it runs. So a load that takes minutes is a worker "loading, 40%", never one
that stopped beating.

Lock order (a thread holding one may take only those below it, never one above):

1. ``Residency._loading``: one load at a time (on demand, or a reload after a keep-alive unload),
   held for the whole load. Only load threads take it: never the heartbeat or the sweeper.
2. ``Residency._memory``: the residents, the load under way and the budget arithmetic. Held for
   bookkeeping only: never across a load, a close, a sleep or Redis I/O.
3. ``Resident._lock``: one resident's model and requests in flight.

The heartbeat (``status``) and the keep-alive sweeper take only 2, briefly. tests/test_residency.py
runs loads, reloads, acquires, sweeps and evictions at once and checks that they all finish.
"""

from __future__ import annotations

import gc
import json
import logging
import threading
import time
from collections.abc import Callable, Mapping
from functools import partial
from pathlib import Path
from typing import Any

import redis

from ollm.contract import KeepAlive, Keys
from ollm.engine.base import Engine
from ollm.errors import OllmError, ServiceUnavailableError
from ollm.settings import Settings
from workers.job import Embedder
from workers.load_progress import LoadProgress
from workers.memory import counted_bytes, plan_for, planned_bytes, planned_peaks, resident_bytes
from workers.resident import Resident, ResidentEmbedder, ResidentEngine, engine_batch_size

log = logging.getLogger(__name__)

# How long a keep-alive reload of a model waits for busy on-demand models to make room.
_RELOAD_WAIT = 60.0


class Residency:
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
        # Told the names a model is served under when it arrives (True) or leaves (False): the
        # worker listens on their queues and beats at once.
        self.on_served: Callable[[list[str], bool], None] = lambda names, served: None
        # Set whenever what /api/ps shows changed (a load, an unload, a request ended): the
        # keep-alive sweeper reports at once. Set from engine threads too, so it is only a flag.
        self.changed = threading.Event()
        self._loading = threading.Lock()
        self._memory = threading.Lock()
        self._load: LoadProgress | None = None
        # The planned peak of each model under models_dir (see ``planned_peaks``), re-planned when
        # the directory changes (a pull, a removal).
        self.peaks: dict[str, int] = {}
        self._peaks_of: tuple[tuple[str, int, int], ...] | None = None
        for resident in residents:
            self._add(resident)

    def _add(self, resident: Resident[Any]) -> None:
        resident.on_change = self.changed.set
        resident.reload = self._reload
        self.residents.append(resident)

    # ---- what the heartbeat and the sweeper read --------------------------------------------------

    def held(self) -> list[Resident[Any]]:
        with self._memory:
            return list(self.residents)

    def holding(self, model: str) -> Resident[Any] | None:
        return next((r for r in self.held() if model in r.names), None)

    def _used(self) -> int:
        """Bytes taken: the loaded models and the room reserved for the load under way. Under _memory."""
        reserved = self._load.reserved if self._load is not None else 0
        return sum(r.size for r in self.residents if r.model is not None) + reserved

    def used(self) -> int:
        with self._memory:
            return self._used()

    def status(self) -> dict[str, str | int]:
        """The registration fields that change as models come and go (see ``WorkerInfo``). Never
        waits on a load: the heartbeat calls it."""
        with self._memory:
            residents = list(self.residents)
            used = self._used()
            load = self._load
        engines = {id(engine): engine for engine in list(self.engines.values())}.values()
        return {
            "running": sum(engine.active() for engine in engines),
            "batch_size": sum(engine_batch_size(engine) for engine in engines),
            "models": json.dumps(sorted({name for r in residents for name in r.names})),
            "pinned": json.dumps(sorted({name for r in residents if r.pinned for name in r.names})),
            "memory_budget": self.budget,
            "memory_used": used,
            "max_loaded_models": self.max_loaded,
            "loads": self.loads,
            "peaks": json.dumps(self.peaks, sort_keys=True),
            "loading": load.info().model_dump_json() if load is not None else "",
        }

    # ---- room ----------------------------------------------------------------------------------

    def _room_for(
        self, name: str, size: int, total: int, deadline: float, keep: Resident[Any] | None = None
    ) -> LoadProgress:
        """Evict idle on-demand models, least recently used first, until ``size`` more bytes and
        one more model fit; then reserve that room for the load of ``name`` and return its progress
        (the caller holds ``_loading`` and ends the reservation). Waits (until ``deadline``,
        monotonic) while the only candidates are busy; raises ServiceUnavailableError when the
        model cannot fit at all or in time."""
        with self._memory:
            pinned = sum(r.size for r in self.residents if r.pinned and r.model is not None and r is not keep)
        if self.budget and size + pinned > self.budget:
            raise ServiceUnavailableError(_too_large(name, size, self.budget, pinned))
        while True:
            with self._memory:
                loaded = [r for r in self.residents if r.model is not None and r is not keep]
                fits = not self.budget or self._used() + size <= self.budget
                if fits and (not self.max_loaded or len(loaded) < self.max_loaded):
                    self._load = LoadProgress(name, size, total)
                    return self._load
                idle = [r for r in loaded if not r.pinned and not r.busy()]
            waiting = self._with_waiting_work(idle)
            victims = [r for r in idle if id(r) not in waiting]
            if victims:
                victim = min(victims, key=lambda r: r.last_used)
                log.info("evicting %s (%d bytes, idle) to make room for %s", victim.name, victim.size, name)
                self.drop(victim, None)
                continue
            if time.monotonic() > deadline:
                raise ServiceUnavailableError(
                    f"no room for model {name!r} ({_gib(size)}) on this worker: its memory budget "
                    f"({_gib(self.budget)}) is taken by models with requests running or waiting"
                )
            time.sleep(0.1)

    def _with_waiting_work(self, residents: list[Resident[Any]]) -> set[int]:
        """Which of ``residents`` (by id) have jobs waiting in their queues, interactive or Batch API:
        each would be placed again as soon as it left. On a Redis error, all of them."""
        if not residents:
            return set()
        try:
            with self.connection.pipeline(transaction=False) as pipe:
                for resident in residents:
                    for name in resident.names:
                        pipe.llen(self.keys.rq_queue_key(name))
                        pipe.llen(self.keys.rq_batch_queue_key(name))
                lengths = iter(pipe.execute())
        except redis.RedisError:
            return {id(r) for r in residents}
        return {id(r) for r in residents if any([next(lengths) for _ in range(2 * len(r.names))])}

    def drop(self, resident: Resident[Any], consumed: str | None) -> bool:
        """Unload a resident if nothing uses it (a model loaded on demand also stops being served
        here); returns whether it was unloaded. The model is closed outside every lock."""
        with self._memory:
            model = resident.detach(consumed)
            if model is None:
                return False
            if not resident.pinned:
                self.residents.remove(resident)
                for name in resident.names:
                    self.engines.pop(name, None)
                    self.embedders.pop(name, None)
        close = getattr(model, "close", None)
        if callable(close):
            close()
        del model, close  # a bound close() would keep the model alive through the collection
        _free_memory()
        log.info("unloaded %s", resident.name)
        if not resident.pinned:
            self.on_served(resident.names, False)
        self.changed.set()
        return True

    def expire(self, keep_alives: dict[int, KeepAlive]) -> None:
        """Unload the idle models whose keep-alive (by resident id) has run out."""
        now = time.time()
        for resident in self.held():
            keep_alive = keep_alives.get(id(resident))
            expires = resident.expires_at(keep_alive)
            if resident.model is not None and expires is not None and expires <= now:
                self.drop(resident, keep_alive.stamp if keep_alive else None)

    # ---- loading -------------------------------------------------------------------------------

    def _reload(self, resident: Resident[Any]) -> Any:
        """Load a resident's model again (it was unloaded after its keep-alive), within the budget."""
        with self._loading:
            if resident.model is not None:  # another request reloaded it meanwhile
                return resident.model
            if resident not in self.held():
                raise ServiceUnavailableError(f"model {resident.name!r} left this worker meanwhile; retry the request")
            started = time.perf_counter()
            log.info("loading %s again (it was unloaded after its keep-alive)", resident.name)
            deadline = time.monotonic() + _RELOAD_WAIT
            progress = self._room_for(resident.name, resident.size, self._weights(resident.name), deadline, resident)
            try:
                with progress.watching():
                    model = resident.load()
            except BaseException:
                self._end_load()
                raise
            self._end_load(partial(resident.set_loaded, model))
            log.info("loaded %s in %.1fs", resident.name, time.perf_counter() - started)
            return model

    def _end_load(self, arrived: Callable[[], None] = lambda: None) -> None:
        """The load under way is over: its model (if ``arrived`` adds it) takes the place of the
        room reserved for it in one step, so the two are never counted together."""
        with self._memory:
            arrived()
            self._load = None
        self.changed.set()

    def request_load(self, model: str) -> None:
        """Load ``model`` now if it is served here but unloaded (Ollama's empty prompt), on a thread
        of its own: the caller (the sweeper) goes on reporting while it loads."""
        for resident in self.held():
            if model in resident.names and resident.model is None:
                threading.Thread(target=_touch, args=(resident,), name="ollm-reload", daemon=True).start()

    def load(self, model: str, deadline: float) -> tuple[Resident[Any], bool]:
        """Have ``model`` loaded here: (its resident, whether this call loaded it). Never a second
        copy: a model already held (under any of its names) is only reloaded if it was unloaded."""
        assert self.settings is not None, "loading on demand needs the worker's settings"
        held = self.holding(model)
        if held is None:
            plan = plan_for(model, self.settings)
            held = self.holding(plan.resolved_reference) or self._holding_files(plan.path)
            if held is not None:
                # The same model under another name (an alias and its directory): serve that name too.
                self._also_serve(held, model)
                self.on_served([model], True)
                self.changed.set()
        if held is not None:
            held.acquire()  # reloads it if it was unloaded
            held.release()
            return held, False
        with self._loading:
            held = self.holding(model)
            if held is not None:  # loaded by a load that held the lock before this one
                return held, False
            resident = self._load_new(model, plan, deadline)
        self.on_served(resident.names, True)
        self.changed.set()
        return resident, True

    def _load_new(self, model: str, plan: Any, deadline: float) -> Resident[Any]:
        from workers.engines import load_models

        assert self.settings is not None
        estimate = planned_bytes(plan)
        progress = self._room_for(model, estimate, self._weights(model), deadline)
        started = time.perf_counter()
        log.info("loading %s on demand (about %s)", model, _gib(estimate))
        try:
            with progress.watching():
                engines, embedders = load_models([model], self.settings)
        except BaseException:
            self._end_load()
            raise
        kind = "engine" if engines else "embedder"
        loaded: Any = (engines or embedders)[model]
        names = list(dict.fromkeys([model, plan.resolved_reference]))
        size = counted_bytes(plan, resident_bytes(loaded))
        resident: Resident[Any] = Resident(names, partial(_load_one, model, kind, self.settings), loaded, size, False)

        def arrived() -> None:
            self._add(resident)
            self._serve(resident, kind)
            self.loads += 1

        self._end_load(arrived)
        log.info("loaded %s in %.1fs (%s)", model, time.perf_counter() - started, _gib(resident.size))
        return resident

    def _weights(self, model: str) -> int:
        """Bytes of weights a load of ``model`` puts in place (its progress's total; 0: unknown)."""
        from ollm import catalogue

        if self.settings is None:
            return 0
        try:
            plan = plan_for(model, self.settings)
        except OllmError:
            return 0
        return catalogue.loaded_weight_bytes(plan.path, plan.dtype)

    def _holding_files(self, path: Path | None) -> Resident[Any] | None:
        """A resident loaded from the directory ``path`` under another name, if any."""
        from ollm.plan import plan_model

        assert self.settings is not None
        if path is None:
            return None
        for resident in self.held():
            try:
                other = plan_model(resident.name, self.settings.runtime).path
            except OllmError:
                continue
            if other is not None and other.resolve() == path.resolve():
                return resident
        return None

    def _also_serve(self, resident: Resident[Any], name: str) -> None:
        with self._memory:
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
        residency = cls(connection, keys, [], budget, settings.worker.max_loaded_models, settings)
        for kind, models in (("engine", engines), ("embedder", embedders)):
            groups: dict[int, list[str]] = {}
            for name, model in models.items():
                groups.setdefault(id(model), []).append(name)
            for names in groups.values():
                first = names[0]
                load = partial(_load_one, first, kind, settings)
                resident: Resident[Any] = Resident(names, load, models[first], _size_of(first, models[first], settings))
                residency._add(resident)
                residency.loads += 1
                residency._serve(resident, kind)
        return residency

    def refresh_peaks(self) -> None:
        """Plan the models under models_dir again if they changed since the last time.

        On a thread of the sweeper's: planning imports transformers (a second or two), which must
        not delay the worker's registration. Until then the scheduler counts weights here."""
        if self.settings is None or not self.settings.worker.on_demand:
            # Only a worker that loads on demand is ever sized by the scheduler.
            return
        models = _models_signature(self.settings.runtime.resolved_models_dir())
        if models == self._peaks_of:
            return
        self._peaks_of = models
        self.peaks = planned_peaks(self.settings)


def _load_one(reference: str, kind: str, settings: Settings) -> Any:
    from workers.engines import load_models

    engines, embedders = load_models([reference], settings)
    return (engines if kind == "engine" else embedders)[reference]


def _touch(resident: Resident[Any]) -> None:
    """Have the resident's model loaded (reloading it if it was unloaded), use nothing."""
    try:
        resident.acquire()
    except Exception:
        log.exception("could not load %s", resident.name)
        return
    resident.release()


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


def _gib(size: int) -> str:
    return f"{size / 2**30:.2f} GiB"


def _too_large(name: str, size: int, budget: int, pinned: int) -> str:
    held = f", {_gib(pinned)} of it held by pinned models" if pinned else ""
    return (
        f"model {name!r} needs about {_gib(size)} but this worker's memory budget is {_gib(budget)}{held}; "
        "raise worker.memory_budget or run a worker with more memory"
    )
