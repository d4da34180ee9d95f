"""The workers and queues as gauges, read from Redis when Prometheus scrapes.

Workers already publish what the scheduler needs (``ollm.contract``): their registration
(``WorkerInfo``: in flight, slots, memory, running sequences, batch size) every heartbeat and the
models they hold (``LoadedModel``). The jobs waiting per model are the lengths of the RQ queues.
So one scrape of any server sees every worker, on whichever host, without scraping the hosts.
``read_cluster`` does the I/O; ``cluster_families`` is the pure translation into metric families.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import redis.asyncio
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from pydantic import ValidationError
from rq import Queue

from ollm.contract import Keys, LoadedModel, WorkerInfo, parse_worker

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class WorkerState:
    """One registered worker: its record, whether it is live, and the models it holds."""

    info: WorkerInfo
    up: bool = True
    loaded: dict[str, LoadedModel] = field(default_factory=dict)


@dataclass(frozen=True)
class ClusterState:
    workers: list[WorkerState] = field(default_factory=list)
    # Model -> jobs waiting in its queue.
    queue_depths: dict[str, int] = field(default_factory=dict)
    # Model -> Batch API lines waiting in its batch queue.
    batch_queue_depths: dict[str, int] = field(default_factory=dict)


async def read_cluster(connection: redis.asyncio.Redis, keys: Keys, lost_after: float) -> ClusterState:
    """Every registered worker (live or not, until its key expires) and every model queue.

    Three round trips whatever the number of workers. Read only: pruning expired names is left
    to the dispatcher's own reads."""
    model_queues = keys.rq_queue_key("")
    batch_queues = keys.rq_batch_queue_key("")
    async with connection.pipeline(transaction=False) as pipe:
        pipe.smembers(keys.workers)
        pipe.smembers(Queue.redis_queues_keys)
        names_raw, queues_raw = await pipe.execute()
    names = sorted(_text(name) for name in names_raw)
    queue_keys = sorted(key for key in map(_text, queues_raw) if key.startswith((model_queues, batch_queues)))
    async with connection.pipeline(transaction=False) as pipe:
        for name in names:
            pipe.hgetall(keys.worker(name))
            pipe.pttl(keys.worker(name))
        for key in queue_keys:
            pipe.llen(key)
        raw = await pipe.execute()
    records, lengths = raw[: 2 * len(names)], raw[2 * len(names) :]
    infos: list[WorkerInfo] = []
    for data, pttl in zip(records[::2], records[1::2], strict=True):
        if not data or pttl < 0:
            continue  # deregistered or expired
        try:
            infos.append(parse_worker(data, pttl))
        except (KeyError, ValueError) as exc:
            log.debug("unreadable worker record: %s", exc)
    async with connection.pipeline(transaction=False) as pipe:
        for info in infos:
            pipe.hgetall(keys.loaded(info.host, info.pid))
        loaded_raw = await pipe.execute()
    workers = [
        WorkerState(info, info.age_seconds <= lost_after, _loaded(entries))
        for info, entries in zip(infos, loaded_raw, strict=True)
    ]
    depths: dict[str, int] = {}
    batch_depths: dict[str, int] = {}
    for key, length in zip(queue_keys, lengths, strict=True):
        if key.startswith(batch_queues):
            batch_depths[key[len(batch_queues) :]] = int(length)
        else:
            depths[key[len(model_queues) :]] = int(length)
    return ClusterState(workers, depths, batch_depths)


def cluster_families(state: ClusterState) -> list[Metric]:
    """The gauges (and the loads counter) of one scrape; see docs/metrics.md."""

    def gauge(name: str, documentation: str, labels: list[str]) -> GaugeMetricFamily:
        return GaugeMetricFamily(name, documentation, labels=labels)

    up = gauge("ollm_worker_up", "1 while the worker's last heartbeat is within worker_lost_seconds.", ["worker"])
    age = gauge("ollm_worker_heartbeat_age_seconds", "Seconds since the worker's last heartbeat.", ["worker"])
    info = gauge(
        "ollm_worker_info", "Always 1; the worker's host, pid, dtype and whether it loads on demand.",
        ["worker", "host", "pid", "dtype", "on_demand"],
    )  # fmt: skip
    start = gauge("ollm_worker_start_time_seconds", "When the worker started (Unix time).", ["worker"])
    in_flight = gauge("ollm_worker_in_flight_requests", "Jobs the worker is running.", ["worker"])
    running = gauge(
        "ollm_worker_running_sequences",
        "Sequences the worker's engines hold: decoding, prefilling or waiting to join a batch.", ["worker"],
    )  # fmt: skip
    batch = gauge("ollm_worker_batch_size", "Sequences in the worker's decode batches now.", ["worker"])
    max_batch = gauge("ollm_worker_max_batch_size", "Jobs the worker runs at once (worker.max_batch).", ["worker"])
    budget = gauge("ollm_worker_memory_budget_bytes", "Bytes the worker may fill with models.", ["worker"])
    used = gauge("ollm_worker_memory_used_bytes", "Bytes the worker's loaded models take.", ["worker"])
    loads = CounterMetricFamily("ollm_worker_loads", "Models loaded since the worker started.", labels=["worker"])
    count = gauge("ollm_worker_loaded_models", "Models the worker holds in memory.", ["worker"])
    model_bytes = gauge(
        "ollm_worker_model_memory_bytes", "Bytes one loaded model takes on the worker.", ["worker", "model", "pinned"]
    )
    model_in_flight = gauge(
        "ollm_worker_model_in_flight_requests", "Requests running on one loaded model.", ["worker", "model"]
    )
    serving = gauge("ollm_model_workers", "Live workers that serve the model.", ["model"])
    depth = gauge("ollm_queue_depth", "Jobs waiting in the model's queue.", ["model"])
    batch_depth = gauge("ollm_batch_queue_depth", "Batch API lines waiting in the model's batch queue.", ["model"])

    served: dict[str, int] = {}
    for worker in state.workers:
        w = worker.info
        name = w.name
        up.add_metric([name], 1.0 if worker.up else 0.0)
        age.add_metric([name], w.age_seconds)
        info.add_metric([name, w.host, str(w.pid), w.dtype, "true" if w.on_demand else "false"], 1.0)
        start.add_metric([name], w.started_at)
        in_flight.add_metric([name], w.in_flight)
        if w.running is not None:
            running.add_metric([name], w.running)
        if w.batch_size is not None:
            batch.add_metric([name], w.batch_size)
        max_batch.add_metric([name], w.max_batch)
        budget.add_metric([name], w.memory_budget)
        used.add_metric([name], w.memory_used)
        loads.add_metric([name], w.loads)
        count.add_metric([name], len(worker.loaded))
        for model, loaded in sorted(worker.loaded.items()):
            model_bytes.add_metric([name, model, "true" if loaded.pinned else "false"], loaded.size)
            model_in_flight.add_metric([name, model], loaded.in_flight)
        if worker.up:
            for model in w.models:
                served[model] = served.get(model, 0) + 1
    for model in sorted(served):
        serving.add_metric([model], served[model])
    # A served model whose queue RQ never created yet has nothing waiting.
    for model, waiting in sorted({**dict.fromkeys(served, 0), **state.queue_depths}.items()):
        depth.add_metric([model], waiting)
    for model, waiting in sorted(state.batch_queue_depths.items()):
        batch_depth.add_metric([model], waiting)
    return [
        up, age, info, start, in_flight, running, batch, max_batch, budget, used, loads, count,
        model_bytes, model_in_flight, serving, depth, batch_depth,
    ]  # fmt: skip


def _loaded(entries: dict[bytes | str, bytes | str]) -> dict[str, LoadedModel]:
    loaded: dict[str, LoadedModel] = {}
    for model, value in entries.items():
        try:
            loaded[_text(model)] = LoadedModel.model_validate_json(value)
        except ValidationError as exc:
            log.debug("unreadable loaded-model entry %r: %s", model, exc)
    return loaded


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value
