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

These scripts write RQ's own keys, so they follow RQ 3's layout (pyproject pins ``rq>=3,<4``); each
key or key prefix is taken from RQ's classes (``Queue``, ``Job``, ``StartedJobRegistry``,
``ExecutionRegistry``, ``IntermediateQueue``) or, where RQ exposes no attribute (an execution's own
key), from ``RQ_KEY_PREFIX`` as RQ builds it, so a prefix set through ``RQ_KEY_PREFIX`` is honoured.
"""

from __future__ import annotations

import time

import redis.asyncio
from rq import Queue
from rq.defaults import RQ_KEY_PREFIX
from rq.executions import WORKER_EXECUTIONS_KEY_TEMPLATE, ExecutionRegistry
from rq.intermediate_queue import IntermediateQueue
from rq.job import Job
from rq.registry import StartedJobRegistry

# RQ's keys, from RQ's own templates (``{}`` stands for the name filled in inside the scripts).
_STARTED = StartedJobRegistry.key_template.format("{}")
_WORKER_EXECUTIONS = WORKER_EXECUTIONS_KEY_TEMPLATE.format("{}")
_EXECUTION = f"{RQ_KEY_PREFIX}:execution:{{}}"  # rq.executions.Execution.key: no class attribute
_QUEUE = f"{Queue.redis_queue_namespace_prefix}{{}}"
_INTERMEDIATE = IntermediateQueue.get_intermediate_queue_key("{}")

# KEYS: the job hash, its execution registry, the set of queues.
# ARGV: job id, the dead worker's name, enqueued_at (RQ's format), then the key templates of the
# started registry, a worker's executions, an execution, a queue and its intermediate list.
_REQUEUE = """
local function key(template, name) return (string.gsub(template, '{}', function() return name end)) end
local job = KEYS[1]
if redis.call('HGET', job, 'status') ~= 'started' then return 0 end
if redis.call('HGET', job, 'worker_name') ~= ARGV[2] then return 0 end
local origin = redis.call('HGET', job, 'origin')
if not origin then return 0 end
local started = key(ARGV[4], origin)
local worker_executions = key(ARGV[5], ARGV[2])
for _, execution in ipairs(redis.call('ZRANGE', KEYS[2], 0, -1)) do
  local composite = ARGV[1] .. ':' .. execution
  redis.call('DEL', key(ARGV[6], composite))
  redis.call('ZREM', started, composite)
  redis.call('SREM', worker_executions, composite)
end
redis.call('DEL', KEYS[2])
redis.call('HDEL', job, 'worker_name', 'started_at', 'last_heartbeat')
redis.call('HSET', job, 'status', 'queued', 'enqueued_at', ARGV[3])
-- A started job is kept without expiry; a queued one lives as long as it was enqueued for.
local ttl = tonumber(redis.call('HGET', job, 'ttl'))
if ttl and ttl > 0 then redis.call('EXPIRE', job, ttl) end
local queue = key(ARGV[7], origin)
-- Where RQ's single-queue dequeue keeps a job until it is started.
redis.call('LREM', key(ARGV[8], queue), 0, ARGV[1])
redis.call('LPUSH', queue, ARGV[1])
redis.call('SADD', KEYS[3], queue)
return 1
"""

# KEYS: the job hash, its queue (the list), the set of queues, the queue's intermediate list.
# ARGV: job id. Only while the job is still ``queued`` and in neither the queue nor the intermediate list.
_REQUEUE_UNQUEUED = """
if redis.call('HGET', KEYS[1], 'status') ~= 'queued' then return 0 end
if redis.call('LPOS', KEYS[2], ARGV[1]) then return 0 end
if redis.call('LPOS', KEYS[4], ARGV[1]) then return 0 end
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
            pipe.lpos(IntermediateQueue.get_intermediate_queue_key(queue_key), job_id)
            found = await pipe.execute()
        return all(position is None for position in found)

    async def requeue_unqueued(self, job_id: str, queue_key: str) -> bool:
        """Put a ``queued`` job that is in no queue back at the front of ``queue_key`` (the Redis
        list). A worker may be about to start a job it has just popped, so call this only when
        ``missing`` said so at a check at least a moment earlier too."""
        intermediate = IntermediateQueue.get_intermediate_queue_key(queue_key)
        keys = [Job.key_for(job_id), queue_key, Queue.redis_queues_keys, intermediate]
        moved = await self._unqueued(keys=keys, args=[job_id])
        return bool(moved)

    async def requeue(self, job_id: str, dead_worker: str) -> bool:
        """Whether this call moved the job back to its queue (False: someone else did, or it
        is no longer the dead worker's run)."""
        enqueued_at = time.strftime("%Y-%m-%dT%H:%M:%S.000000Z", time.gmtime())
        moved = await self._script(
            keys=[Job.key_for(job_id), ExecutionRegistry.key_template.format(job_id), Queue.redis_queues_keys],
            args=[job_id, dead_worker, enqueued_at, _STARTED, _WORKER_EXECUTIONS, _EXECUTION, _QUEUE, _INTERMEDIATE],
        )
        return bool(moved)
