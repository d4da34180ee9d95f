"""Batches of /v1/batches in Redis: each one a hash, so a status change, a finished line and a
cancel are each one atomic command, whichever server process makes them.

* ``<ns>:batch:<id>``: the batch's fields (OpenAI's Batch object, flattened; the request counts
  are counters the finished lines increment);
* ``<ns>:batch-results:<id>``: request index -> the line's output or error line, written once
  (``HSETNX``) with its count, so a line finished twice (a resumed batch) counts once; read back
  in order a slice at a time (``HMGET``), never whole;
* ``<ns>:batch-done:<id>``: a bitmap of the requests that have a result (what is left to run,
  at most 50,000 bits);
* ``<ns>:batches`` (sorted by creation) lists them a page at a time; ``<ns>:batches-active``
  holds the batches not yet final, which is what a restarted server resumes, and is what
  ``server.max_active_batches`` counts; ``<ns>:batches-expiry`` holds the final ones by the time
  their record expires (``server.batch_retention_seconds`` after they ended).
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator, Container
from typing import Any, Literal

import redis.asyncio
from pydantic import BaseModel, Field

from ollm.contract import Keys
from server.stores.index import page_ids, text

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
  redis.call('SETBIT', KEYS[3], ARGV[1], 1)
  return 1
end
return 0
"""

# A new batch, unless ARGV[1] batches are active already (0). ARGV[2]: id, ARGV[3]: creation
# score, ARGV[4..]: the hash's fields and values.
_CREATE = """
if redis.call('SCARD', KEYS[3]) >= tonumber(ARGV[1]) then return 0 end
redis.call('HSET', KEYS[1], unpack(ARGV, 4))
redis.call('ZADD', KEYS[2], ARGV[3], ARGV[2])
redis.call('SADD', KEYS[3], ARGV[2])
return 1
"""

# Results are read back this many at a time.
_SLICE = 500
# Expired batches removed per round trip of a sweep.
_SWEEP_BATCH = 100


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
# Kept beside the Batch object's fields in its hash, not part of it (OpenAI's Batch has no such field).
_OUTPUT_EXPIRY = "output_expires_after"
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
    fields = {text(k): text(v) for k, v in raw.items()}
    data: dict[str, Any] = {
        k: (json.loads(v) if k in _JSON_FIELDS else v) for k, v in fields.items() if k not in (*_COUNTS, _OUTPUT_EXPIRY)
    }
    data["request_counts"] = {name: int(fields.get(name, 0)) for name in _COUNTS}
    return BatchRecord.model_validate(data)


class BatchStore:
    def __init__(self, connection: redis.asyncio.Redis, keys: Keys, retention_seconds: float) -> None:
        self.connection = connection
        self.keys = keys
        self.retention_seconds = retention_seconds
        self._transition = connection.register_script(_TRANSITION)
        self._result = connection.register_script(_RESULT)
        self._create = connection.register_script(_CREATE)

    async def create(self, record: BatchRecord, *, max_active: int, output_expires_after: int | None) -> bool:
        """Store a new batch; False (and nothing stored) when ``max_active`` batches are not
        final yet. ``output_expires_after``: seconds its output files are kept (None: until deleted)."""
        fields = _to_hash(record)
        if output_expires_after is not None:
            fields[_OUTPUT_EXPIRY] = str(output_expires_after)
        flat = [item for pair in fields.items() for item in pair]
        keys = [self.keys.batch(record.id), self.keys.batches, self.keys.active_batches]
        return bool(await self._create(keys=keys, args=[max_active, record.id, time.time(), *flat]))

    async def get(self, batch_id: str) -> BatchRecord | None:
        raw = await self.connection.hgetall(self.keys.batch(batch_id))
        return _from_hash(raw) if raw else None

    async def output_expires_after(self, batch_id: str) -> int | None:
        raw = await self.connection.hget(self.keys.batch(batch_id), _OUTPUT_EXPIRY)
        return None if raw is None else int(raw)

    async def listing(self, after: str | None, limit: int) -> tuple[list[BatchRecord], bool]:
        """One page of batches, newest first (as OpenAI lists them), and whether more follow."""
        ids, has_more = await page_ids(self.connection, self.keys.batches, after, limit, newest_first=True)
        async with self.connection.pipeline(transaction=False) as pipe:
            for batch_id in ids:
                pipe.hgetall(self.keys.batch(batch_id))
            raws = await pipe.execute()
        return [_from_hash(raw) for raw in raws if raw], has_more

    async def active(self) -> list[str]:
        return sorted(text(i) for i in await self.connection.smembers(self.keys.active_batches))

    async def inactive(self, batch_id: str) -> None:
        """No longer resumed (it is final, or gone)."""
        await self.connection.srem(self.keys.active_batches, batch_id)

    async def move(self, batch_id: str, to: Status, *, from_: tuple[Status, ...]) -> bool:
        """Set the status to ``to`` (and ``<to>_at`` to now) if it is one of ``from_``: two
        writers (the driver, a cancel) never undo each other's step."""
        now = time.time()
        moved = await self._transition(keys=[self.keys.batch(batch_id)], args=[to, int(now), *from_])
        if moved and to in FINAL:
            async with self.connection.pipeline(transaction=True) as pipe:
                pipe.srem(self.keys.active_batches, batch_id)
                pipe.zadd(self.keys.batches_expiry, {batch_id: now + self.retention_seconds})
                await pipe.execute()
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

    async def record(self, batch_id: str, index: int, result: str, ok: bool) -> bool:
        """Keep one finished request's result; False if it had been recorded already."""
        return bool(await self._result(keys=self._record_keys(batch_id), args=[index, result, _count(ok)]))

    async def record_all(self, batch_id: str, results: list[tuple[int, str, bool]]) -> None:
        """``record`` for many requests (index, result, ok) in one round trip: a file's rejected lines."""
        keys = self._record_keys(batch_id)
        async with self.connection.pipeline(transaction=False) as pipe:
            for index, result, ok in results:
                await self._result(keys=keys, args=[index, result, _count(ok)], client=pipe)
            await pipe.execute()

    def _record_keys(self, batch_id: str) -> list[str]:
        return [self.keys.batch(batch_id), self.keys.batch_results(batch_id), self.keys.batch_done(batch_id)]

    async def done(self, batch_id: str) -> Done:
        """Which requests have a result (one bit each, not the results)."""
        bits = await self.connection.get(self.keys.batch_done(batch_id))
        return Done(bits if isinstance(bits, bytes) else b"")

    async def results(self, batch_id: str, total: int) -> AsyncIterator[tuple[int, str]]:
        """Requests 1..``total``'s results in order, read a slice at a time; those without one skipped."""
        for start in range(1, total + 1, _SLICE):
            indexes = range(start, min(start + _SLICE, total + 1))
            values = await self.connection.hmget(self.keys.batch_results(batch_id), list(indexes))
            for index, value in zip(indexes, values, strict=True):
                if value is not None:
                    yield index, text(value)

    async def drop_results(self, batch_id: str) -> None:
        await self.connection.delete(*self._results_keys(batch_id))

    async def sweep(self) -> int:
        """Remove the final batches whose records expired; how many went."""
        removed = 0
        while ids := await self.connection.zrangebyscore(
            self.keys.batches_expiry, "-inf", time.time(), start=0, num=_SWEEP_BATCH
        ):
            async with self.connection.pipeline(transaction=True) as pipe:
                for batch_id in map(text, ids):
                    pipe.delete(self.keys.batch(batch_id), *self._results_keys(batch_id))
                    pipe.zrem(self.keys.batches, batch_id)
                    pipe.zrem(self.keys.batches_expiry, batch_id)
                await pipe.execute()
            removed += len(ids)
        return removed

    def _results_keys(self, batch_id: str) -> tuple[str, str]:
        return self.keys.batch_results(batch_id), self.keys.batch_done(batch_id)


def _count(ok: bool) -> str:
    return "completed" if ok else "failed"


class Done(Container[int]):
    """A batch's bitmap of finished requests, as Redis stores it (bit 0 is the first byte's highest)."""

    def __init__(self, bits: bytes) -> None:
        self.bits = bits

    def __contains__(self, index: object) -> bool:
        if not isinstance(index, int):
            return False
        byte = index >> 3
        return byte < len(self.bits) and bool(self.bits[byte] & (0x80 >> (index & 7)))
