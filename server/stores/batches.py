"""Batches of /v1/batches in Redis: each one a hash, so a status change, a finished line and a
cancel are each one atomic command, whichever server process makes them.

* ``<ns>:batch:<id>``: the batch's fields (OpenAI's Batch object, flattened; the request counts
  are counters the finished lines increment);
* ``<ns>:batch-results:<id>``: line number -> the line's output or error line, written once
  (``HSETNX``) with its count, so a line finished twice (a resumed batch) counts once;
* ``<ns>:batches`` (sorted by creation) lists them; ``<ns>:batches-active`` holds the batches
  not yet final, which is what a restarted server resumes.
"""

from __future__ import annotations

import json
import time
from typing import Any, Literal

import redis.asyncio
from pydantic import BaseModel, Field

from ollm.contract import Keys

Status = Literal["validating", "failed", "in_progress", "finalizing", "completed", "expired", "cancelling", "cancelled"]
FINAL: frozenset[str] = frozenset({"failed", "completed", "expired", "cancelled"})

# Move to ARGV[1] (stamping ARGV[1]_at with ARGV[2]) only from one of ARGV[3..]; 1 if it moved.
_TRANSITION = """
local status = redis.call('HGET', KEYS[1], 'status')
if not status then return 0 end
for i = 3, #ARGV do
  if ARGV[i] == status then
    redis.call('HSET', KEYS[1], 'status', ARGV[1], ARGV[1] .. '_at', ARGV[2])
    return 1
  end
end
return 0
"""

# A finished line is kept once and counted once (ARGV[3]: "completed" or "failed").
_RESULT = """
if redis.call('HSETNX', KEYS[2], ARGV[1], ARGV[2]) == 1 then
  redis.call('HINCRBY', KEYS[1], ARGV[3], 1)
  return 1
end
return 0
"""


class BatchError(BaseModel):
    code: str
    message: str
    line: int | None = None
    param: str | None = None


class RequestCounts(BaseModel):
    total: int = 0
    completed: int = 0
    failed: int = 0


class BatchRecord(BaseModel):
    """OpenAI's Batch object, as returned."""

    id: str
    object: Literal["batch"] = "batch"
    endpoint: str
    input_file_id: str
    completion_window: str
    status: Status
    created_at: int
    expires_at: int | None = None
    in_progress_at: int | None = None
    finalizing_at: int | None = None
    completed_at: int | None = None
    failed_at: int | None = None
    expired_at: int | None = None
    cancelling_at: int | None = None
    cancelled_at: int | None = None
    output_file_id: str | None = None
    error_file_id: str | None = None
    errors: dict[str, Any] | None = Field(None, description='{"object": "list", "data": [BatchError, ...]}')
    metadata: dict[str, str] | None = None
    request_counts: RequestCounts = Field(default_factory=RequestCounts)

    @property
    def final(self) -> bool:
        return self.status in FINAL


_JSON_FIELDS = ("errors", "metadata")
_COUNTS = ("total", "completed", "failed")


def _to_hash(record: BatchRecord) -> dict[Any, Any]:
    fields: dict[Any, Any] = {}
    for name, value in record.model_dump(exclude={"request_counts"}).items():
        if value is None:
            continue
        fields[name] = json.dumps(value) if name in _JSON_FIELDS else str(value)
    fields.update({name: str(getattr(record.request_counts, name)) for name in _COUNTS})
    return fields


def _from_hash(raw: dict[Any, Any]) -> BatchRecord:
    fields = {_text(k): _text(v) for k, v in raw.items()}
    data: dict[str, Any] = {
        k: (json.loads(v) if k in _JSON_FIELDS else v) for k, v in fields.items() if k not in _COUNTS
    }
    data["request_counts"] = {name: int(fields.get(name, 0)) for name in _COUNTS}
    return BatchRecord.model_validate(data)


class BatchStore:
    def __init__(self, connection: redis.asyncio.Redis, keys: Keys) -> None:
        self.connection = connection
        self.keys = keys
        self._transition = connection.register_script(_TRANSITION)
        self._result = connection.register_script(_RESULT)

    async def create(self, record: BatchRecord) -> None:
        async with self.connection.pipeline(transaction=True) as pipe:
            pipe.hset(self.keys.batch(record.id), mapping=_to_hash(record))
            pipe.zadd(self.keys.batches, {record.id: time.time()})
            pipe.sadd(self.keys.active_batches, record.id)
            await pipe.execute()

    async def get(self, batch_id: str) -> BatchRecord | None:
        raw = await self.connection.hgetall(self.keys.batch(batch_id))
        return _from_hash(raw) if raw else None

    async def listing(self) -> list[BatchRecord]:
        """Every batch, oldest first (a local server holds few; pagination is the caller's)."""
        ids = [_text(i) for i in await self.connection.zrange(self.keys.batches, 0, -1)]
        async with self.connection.pipeline(transaction=False) as pipe:
            for batch_id in ids:
                pipe.hgetall(self.keys.batch(batch_id))
            raws = await pipe.execute()
        return [_from_hash(raw) for raw in raws if raw]

    async def active(self) -> list[str]:
        return sorted(_text(i) for i in await self.connection.smembers(self.keys.active_batches))

    async def inactive(self, batch_id: str) -> None:
        """No longer resumed (it is final, or gone)."""
        await self.connection.srem(self.keys.active_batches, batch_id)

    async def move(self, batch_id: str, to: Status, *, from_: tuple[Status, ...]) -> bool:
        """Set the status to ``to`` (and ``<to>_at`` to now) if it is one of ``from_``: two
        writers (the driver, a cancel) never undo each other's step."""
        moved = await self._transition(keys=[self.keys.batch(batch_id)], args=[to, int(time.time()), *from_])
        if moved and to in FINAL:
            await self.connection.srem(self.keys.active_batches, batch_id)
        return bool(moved)

    async def update(self, batch_id: str, **fields: Any) -> None:
        """Set fields other than the status (totals, file ids, errors)."""
        mapping: dict[Any, Any] = {
            name: json.dumps(value) if name in _JSON_FIELDS else str(value)
            for name, value in fields.items()
            if value is not None
        }
        if mapping:
            await self.connection.hset(self.keys.batch(batch_id), mapping=mapping)

    async def record(self, batch_id: str, line: int, result: str, ok: bool) -> bool:
        """Keep one finished line's result; False if that line had been recorded already."""
        keys = [self.keys.batch(batch_id), self.keys.batch_results(batch_id)]
        return bool(await self._result(keys=keys, args=[line, result, "completed" if ok else "failed"]))

    async def results(self, batch_id: str) -> dict[int, str]:
        raw = await self.connection.hgetall(self.keys.batch_results(batch_id))
        return {int(_text(k)): _text(v) for k, v in raw.items()}

    async def drop_results(self, batch_id: str) -> None:
        await self.connection.delete(self.keys.batch_results(batch_id))


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else value
