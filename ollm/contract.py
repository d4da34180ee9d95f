"""The contract between the server and the workers: what crosses Redis, defined once.

Both ``server/`` and ``workers/`` import this module and nothing of each other's:

* every Redis key, queue and channel name (``Keys``);
* the job functions the server enqueues, by dotted name (``GENERATE_JOB``, ``EMBED_JOB``,
  ``LOAD_JOB``) and the load message (``LoadRequest``);
* the worker registration record (``WorkerInfo``, with the worker's memory budget and what it
  holds) and its readers (``live_workers``, ``worker_age``);
* keep-alive values and load/unload messages (``KeepAlive``, ``ResidencyMessage``);
* what each worker reports about its loaded models (``LoadedModel``) and the load it is doing now
  (``LoadingModel``).

All keys and channels start with the configured namespace; RQ's own keys all start with its
``RQ_KEY_PREFIX`` (``rq``), and a namespace equal to it is refused, so the two never collide.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any, Literal

import redis.asyncio
from pydantic import BaseModel, Field
from rq import Queue
from rq.defaults import RQ_KEY_PREFIX

from ollm.errors import InvalidRequestError, SettingsError

# What the server enqueues; RQ stores a job's function by dotted name, so these are strings and
# the server never imports the module that defines the functions (workers/job.py).
GENERATE_JOB = "workers.job.generate"
EMBED_JOB = "workers.job.embed"
LOAD_JOB = "workers.job.load"

# Ids a client sends back (response and session ids): what ollm itself issues (``resp_<hex>``,
# ``sess_<hex>``) and any similar token, never a pattern, a separator or a path.
_CLIENT_ID = re.compile(r"[A-Za-z0-9_-]{1,128}")


def client_id(value: str, what: str) -> str:
    """``value`` when it is a well-formed id; else a 400, before it becomes part of any key."""
    if not _CLIENT_ID.fullmatch(value):
        raise InvalidRequestError(
            f"{value[:64]!r} is not a valid {what} id (letters, digits, _ and -, at most 128)", param=f"{what}_id"
        )
    return value


@dataclass(frozen=True)
class Keys:
    namespace: str = "ollm"

    def __post_init__(self) -> None:
        if not self.namespace or self.namespace == RQ_KEY_PREFIX:
            raise SettingsError(
                f"redis.namespace {self.namespace!r} would collide with RQ's keys; pick another"
            )

    def queue(self, model: str) -> str:
        """The RQ queue name for one served model reference (RQ stores it under ``rq:queue:``)."""
        return f"{self.namespace}:model:{model}"

    def rq_queue_key(self, model: str) -> str:
        """The Redis list behind ``queue(model)``: its length is how many jobs wait for the model."""
        return f"{Queue.redis_queue_namespace_prefix}{self.queue(model)}"

    def batch_queue(self, model: str) -> str:
        """The RQ queue of ``model``'s Batch API lines: workers dequeue it only after ``queue(model)``
        and every other interactive queue, and only while they have a batch slot free."""
        return f"{self.namespace}:model-batch:{model}"

    def rq_batch_queue_key(self, model: str) -> str:
        """The Redis list behind ``batch_queue(model)``: the Batch API lines waiting for the model."""
        return f"{Queue.redis_queue_namespace_prefix}{self.batch_queue(model)}"

    def worker_queue(self, name: str) -> str:
        """The RQ queue only the named worker listens on: the load requests placed on it."""
        return f"{self.namespace}:to-worker:{name}"

    def load_claim(self, model: str) -> str:
        """Set (NX) by whoever places a load of ``model``: while it exists no second load starts.
        Its value is a ``LoadRequest`` (JSON); the loading worker deletes it when done."""
        return f"{self.namespace}:loading:{model}"

    def load_failed(self, model: str) -> str:
        """Why the last load of ``model`` failed (a short-lived message for the requests waiting)."""
        return f"{self.namespace}:load-failed:{model}"

    def events(self, job_id: str) -> str:
        """Pub/sub channel the worker publishes one job's events on."""
        return f"{self.namespace}:events:{job_id}"

    @property
    def cancel_channel(self) -> str:
        """Pub/sub channel every worker listens on for request ids to cancel."""
        return f"{self.namespace}:cancel"

    def cancelled(self, job_id: str) -> str:
        """Marker set before a cancel is published, for a job no worker had picked up yet."""
        return f"{self.namespace}:cancelled:{job_id}"

    def worker(self, name: str) -> str:
        return f"{self.namespace}:worker:{name}"

    @property
    def workers(self) -> str:
        """Set of worker names; members whose heartbeat key expired are pruned by readers."""
        return f"{self.namespace}:workers"

    def response(self, response_id: str) -> str:
        return f"{self.namespace}:response:{client_id(response_id, 'response')}"

    def session(self, session_id: str) -> str:
        return f"{self.namespace}:session:{client_id(session_id, 'session')}"

    def file(self, file_id: str) -> str:
        """A /v1/files record (JSON); the content is on disk under ``server.files_dir``."""
        return f"{self.namespace}:file:{client_id(file_id, 'file')}"

    @property
    def files(self) -> str:
        """Sorted set of file ids by creation time (listing, pagination)."""
        return f"{self.namespace}:files"

    def files_of(self, purpose: str) -> str:
        """Sorted set of the ids of one purpose's files by creation time (a listing by purpose)."""
        return f"{self.namespace}:files-of:{purpose}"

    @property
    def files_expiry(self) -> str:
        """Sorted set of file ids by the time they expire (only files that do)."""
        return f"{self.namespace}:files-expiry"

    def batch(self, batch_id: str) -> str:
        """Hash of one /v1/batches batch: its record, status, timestamps and request counts."""
        return f"{self.namespace}:batch:{client_id(batch_id, 'batch')}"

    def batch_results(self, batch_id: str) -> str:
        """Hash of a running batch's finished lines: line number -> output or error line (JSON)."""
        return f"{self.namespace}:batch-results:{client_id(batch_id, 'batch')}"

    def batch_done(self, batch_id: str) -> str:
        """Bitmap of a running batch's finished lines (bit n: request n has a result): what is
        left to run, read without reading the results."""
        return f"{self.namespace}:batch-done:{client_id(batch_id, 'batch')}"

    def batch_lease(self, batch_id: str) -> str:
        """Who drives the batch now (SET NX PX, renewed): two servers never run the same batch."""
        return f"{self.namespace}:batch-lease:{client_id(batch_id, 'batch')}"

    @property
    def batches(self) -> str:
        """Sorted set of batch ids by creation time (listing, pagination)."""
        return f"{self.namespace}:batches"

    @property
    def batches_expiry(self) -> str:
        """Sorted set of final batch ids by the time their records expire."""
        return f"{self.namespace}:batches-expiry"

    @property
    def active_batches(self) -> str:
        """Set of the batches not yet in a final state: what a (re)started server resumes."""
        return f"{self.namespace}:batches-active"

    def keep_alive(self, model: str) -> str:
        """The keep-alive a client last asked for on ``model`` (JSON: seconds, or null for forever)."""
        return f"{self.namespace}:keep_alive:{model}"

    @property
    def residency_channel(self) -> str:
        """Pub/sub channel telling workers to load or unload a model now (``ResidencyMessage``)."""
        return f"{self.namespace}:residency"

    def loaded(self, host: str, pid: int) -> str:
        """Hash of the models one worker process holds in memory (model -> ``LoadedModel`` JSON)."""
        return f"{self.namespace}:loaded:{host}:{pid}"

    @property
    def derived_models(self) -> str:
        """Hash of models made by /api/create or /api/copy: name -> ``DerivedModel`` JSON."""
        return f"{self.namespace}:derived_models"


# ---- messages ------------------------------------------------------------------------------------


class LoadRequest(BaseModel):
    """A placed load: the job on ``worker``'s own queue and the value of the model's load claim."""

    model: str
    worker: str
    claim: str = Field(description="Unique per placement: only the claim's owner may delete it.")
    replica: bool = False


class ResidencyMessage(BaseModel):
    """Published on ``Keys.residency_channel``: load or unload ``model`` now (Ollama's empty prompt)."""

    model: str
    action: Literal["load", "unload"]


@dataclass(frozen=True)
class KeepAlive:
    """One client choice: ``seconds`` None keeps the model loaded forever. ``stamp`` orders choices
    and lets a worker tell a choice it has already acted on from a new one."""

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


class LoadedModel(BaseModel):
    """One model in a worker's memory, as the worker reports it (``Keys.loaded``)."""

    names: list[str]
    size: int = Field(0, description="Bytes the loaded weights really take (parameters and buffers).")
    loaded_at: float = 0.0
    expires_at: float | None = Field(None, description="Epoch seconds; None: kept until evicted or forever.")
    last_used: float = 0.0
    in_flight: int = 0
    pinned: bool = False


class LoadingModel(BaseModel):
    """A load under way on one worker: how far it has got, so a client or the scheduler can tell
    a worker that is loading (and beating) from one that is gone."""

    model: str
    bytes_read: int = Field(0, description="Bytes of weights in place so far.")
    bytes_total: int = Field(0, description="Bytes of weights the load will put in place (0: unknown).")
    started_at: float = Field(0.0, description="Epoch seconds.")

    @property
    def progress(self) -> float | None:
        """The share done, 0 to 1; None when the total is unknown."""
        return min(1.0, self.bytes_read / self.bytes_total) if self.bytes_total else None


# ---- registration ------------------------------------------------------------------------------


class WorkerInfo(BaseModel):
    name: str
    host: str
    pid: int
    models: list[str]
    in_flight: int = 0
    max_batch: int = 1
    # Optional, so the records of workers that do not report them still parse (None: not reported).
    running: int | None = Field(
        None, description="Sequences its engines hold now: decoding, prefilling or waiting to join a batch."
    )
    batch_size: int | None = Field(None, description="Sequences in its engines' decode batches now.")
    started_at: float = 0.0
    age_seconds: float = Field(0.0, description="Seconds since the last heartbeat.")
    on_demand: bool = Field(False, description="Loads models it is asked for, besides its pinned ones.")
    pinned: list[str] = Field(default_factory=list, description="Models loaded at start and never evicted.")
    memory_budget: int = Field(0, description="Bytes this worker may fill with models.")
    memory_used: int = Field(0, description="Bytes its loaded models take now.")
    max_loaded_models: int = Field(0, description="Models it holds at once at most (0: no limit).")
    loads: int = Field(0, description="Models loaded since start (start-up loads included).")
    dtype: str = Field("", description="The dtype it runs models in on its device: what a model's size depends on.")
    peaks: dict[str, int] = Field(
        default_factory=dict,
        description="Planned peak bytes (weights held, KV cache, activations) of each model under its models "
        "directory, by directory name, as this worker would run it: what the scheduler sizes a model by.",
    )
    draining: bool = Field(False, description="Stopping: takes no new work, finishes what it runs.")
    loading: LoadingModel | None = Field(None, description="The load it is doing now, with its progress.")


def ttl_ms_for(heartbeat_seconds: float) -> int:
    # Long enough that readers, not Redis expiry, decide liveness with their own bound; short
    # enough that a dead worker's key disappears by itself.
    return int(max(30.0, 10 * heartbeat_seconds) * 1000)


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
        info = parse_worker(data, pttl)
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


async def loaded_models(connection: redis.asyncio.Redis, keys: Keys, worker: WorkerInfo) -> dict[str, LoadedModel]:
    """What one worker reports holding in memory, by model name."""
    raw = await connection.hgetall(keys.loaded(worker.host, worker.pid))
    return {_text(name): LoadedModel.model_validate_json(value) for name, value in raw.items()}


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def parse_worker(data: dict[Any, Any], pttl: int) -> WorkerInfo:
    fields = {_text(k): _text(v) for k, v in data.items()}
    return WorkerInfo(
        name=fields["name"],
        host=fields.get("host", "?"),
        pid=int(fields.get("pid", 0)),
        models=json.loads(fields.get("models", "[]")),
        in_flight=int(fields.get("in_flight", 0)),
        max_batch=int(fields.get("max_batch", 1)),
        running=_optional_int(fields.get("running")),
        batch_size=_optional_int(fields.get("batch_size")),
        started_at=float(fields.get("started_at", 0)),
        age_seconds=max(0.0, (int(fields.get("ttl_ms", pttl)) - pttl) / 1000),
        on_demand=fields.get("on_demand") == "1",
        pinned=json.loads(fields.get("pinned", "[]")),
        memory_budget=int(fields.get("memory_budget", 0)),
        memory_used=int(fields.get("memory_used", 0)),
        max_loaded_models=int(fields.get("max_loaded_models", 0)),
        loads=int(fields.get("loads", 0)),
        dtype=fields.get("dtype", ""),
        peaks=json.loads(fields.get("peaks", "{}")),
        draining=fields.get("draining") == "1",
        loading=LoadingModel.model_validate_json(fields["loading"]) if fields.get("loading") else None,
    )


def _optional_int(value: str | None) -> int | None:
    return None if value is None else int(value)
