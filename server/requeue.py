"""Put a job whose worker died before its first token back at the front of its model's queue.

Two ways a job is stranded, each undone by one Lua script (atomic, so two server replicas or two
checks never requeue it twice):

* ``requeue``: its worker started it and died (or was stopped) before publishing a token;
* ``requeue_unqueued``: a worker took it off the queue and died before marking it started. RQ's
  dequeue is a pop followed by several round trips; a worker killed in between (``kill -9``, a
  second SIGTERM) leaves a job whose record still says ``queued`` but that is in no queue and no
  registry, which no RQ clean-up ever finds.

Nothing of the answer has reached the client, so another live worker can run it from the start
and the client only sees a slower answer. One Lua script does it, so it is atomic: the job is
requeued only while it is still the run the dead worker started (status ``started``, that
``worker_name``). A second server replica, or a second check of the same stream, finds the job
queued (or started by another worker) and leaves it alone.

RQ's registries stay consistent: the dead run's executions leave the started registry, the
job's execution registry and the dead worker's execution index, exactly as RQ removes a finished
execution, so RQ's own abandoned-job clean-up never fails the requeued job later.
"""

from __future__ import annotations

import time

import redis.asyncio

# KEYS: the job hash, its execution registry, the set of queues.
# ARGV: job id, the dead worker's name, enqueued_at (RQ's format).
_REQUEUE = """
local job = KEYS[1]
if redis.call('HGET', job, 'status') ~= 'started' then return 0 end
if redis.call('HGET', job, 'worker_name') ~= ARGV[2] then return 0 end
local origin = redis.call('HGET', job, 'origin')
if not origin then return 0 end
local started = 'rq:wip:' .. origin
local worker_executions = 'rq:worker:' .. ARGV[2] .. ':executions'
for _, execution in ipairs(redis.call('ZRANGE', KEYS[2], 0, -1)) do
  local composite = ARGV[1] .. ':' .. execution
  redis.call('DEL', 'rq:execution:' .. composite)
  redis.call('ZREM', started, composite)
  redis.call('SREM', worker_executions, composite)
end
redis.call('DEL', KEYS[2])
redis.call('HDEL', job, 'worker_name', 'started_at', 'last_heartbeat')
redis.call('HSET', job, 'status', 'queued', 'enqueued_at', ARGV[3])
-- A started job is kept without expiry; a queued one lives as long as it was enqueued for.
local ttl = tonumber(redis.call('HGET', job, 'ttl'))
if ttl and ttl > 0 then redis.call('EXPIRE', job, ttl) end
local queue = 'rq:queue:' .. origin
-- Where RQ's single-queue dequeue keeps a job until it is started.
redis.call('LREM', queue .. ':intermediate', 0, ARGV[1])
redis.call('LPUSH', queue, ARGV[1])
redis.call('SADD', KEYS[3], queue)
return 1
"""

# KEYS: the job hash, its queue (the list), the set of queues. ARGV: job id.
# Only while the job is still ``queued`` and in neither the queue nor RQ's intermediate list.
_REQUEUE_UNQUEUED = """
if redis.call('HGET', KEYS[1], 'status') ~= 'queued' then return 0 end
if redis.call('LPOS', KEYS[2], ARGV[1]) then return 0 end
if redis.call('LPOS', KEYS[2] .. ':intermediate', ARGV[1]) then return 0 end
redis.call('LPUSH', KEYS[2], ARGV[1])
redis.call('SADD', KEYS[3], KEYS[2])
return 1
"""


class Requeuer:
    def __init__(self, connection: redis.asyncio.Redis) -> None:
        self.connection = connection
        self._script = connection.register_script(_REQUEUE)
        self._unqueued = connection.register_script(_REQUEUE_UNQUEUED)

    async def missing(self, job_id: str, queue_key: str) -> bool:
        """Whether a job is in neither its queue nor RQ's intermediate list (one round trip)."""
        async with self.connection.pipeline(transaction=False) as pipe:
            pipe.lpos(queue_key, job_id)
            pipe.lpos(f"{queue_key}:intermediate", job_id)
            found = await pipe.execute()
        return all(position is None for position in found)

    async def requeue_unqueued(self, job_id: str, queue_key: str) -> bool:
        """Put a ``queued`` job that is in no queue back at the front of ``queue_key`` (the Redis
        list). A worker may be about to start a job it has just popped, so call this only when
        ``missing`` said so at a check at least a moment earlier too."""
        moved = await self._unqueued(keys=[f"rq:job:{job_id}", queue_key, "rq:queues"], args=[job_id])
        return bool(moved)

    async def requeue(self, job_id: str, dead_worker: str) -> bool:
        """Whether this call moved the job back to its queue (False: someone else did, or it
        is no longer the dead worker's run)."""
        enqueued_at = time.strftime("%Y-%m-%dT%H:%M:%S.000000Z", time.gmtime())
        moved = await self._script(
            keys=[f"rq:job:{job_id}", f"rq:executions:{job_id}", "rq:queues"],
            args=[job_id, dead_worker, enqueued_at],
        )
        return bool(moved)
