"""The requeue of a job whose worker died before its first token, against a real Redis."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import pytest
import redis
import redis.asyncio
from rq import Queue
from rq.executions import prepare_execution
from rq.job import Job, JobStatus
from rq.registry import StartedJobRegistry
from rq.serializers import JSONSerializer
from rq.worker import SimpleWorker

from ollm.contract import GENERATE_JOB
from server.requeue import Requeuer
from tests.integration.harness import new_namespace
from workers import worker
from workers.redis_server import RedisServer


def started_by_a_worker(connection: redis.Redis, queue: Queue, worker_name: str) -> Job:
    """A job as RQ leaves it when the named worker has started it (and then died)."""
    job = queue.enqueue(GENERATE_JOB, {"id": "x"}, ttl=120)
    assert queue.pop_job_id() == job.id  # what the worker's dequeue did
    worker = SimpleWorker([queue], connection=connection, name=worker_name, serializer=JSONSerializer)
    prepare_execution(worker, job)
    worker.prepare_job_execution(job)
    return job


def test_a_dead_workers_job_goes_back_to_the_front_of_its_queue_once(redis_server: RedisServer) -> None:
    connection = redis.Redis.from_url(redis_server.url)
    queue = Queue(f"{new_namespace()}:model:echo", connection=connection, serializer=JSONSerializer)
    job = started_by_a_worker(connection, queue, "dead-worker")
    waiting = queue.enqueue(GENERATE_JOB, {"id": "y"})
    started = StartedJobRegistry(queue.name, connection=connection, serializer=JSONSerializer)
    assert job.get_status() == JobStatus.STARTED and started.get_job_ids() == [job.id]

    async def requeue(worker: str) -> bool:
        client = redis.asyncio.Redis.from_url(redis_server.url)
        try:
            return await Requeuer(client).requeue(job.id, worker)
        finally:
            await client.aclose()

    # Not the worker that started it: left alone.
    assert not asyncio.run(requeue("another-worker"))
    assert asyncio.run(requeue("dead-worker"))
    # A second server replica's check finds it queued and does nothing.
    assert not asyncio.run(requeue("dead-worker"))

    assert queue.get_job_ids() == [job.id, waiting.id]
    job.refresh()
    assert job.get_status() == JobStatus.QUEUED and job.worker_name is None
    assert started.get_job_ids() == [] and job.get_executions() == []
    assert connection.smembers("rq:worker:dead-worker:executions") == set()
    assert 0 < connection.ttl(job.key) <= 120
    connection.close()


def test_a_queued_job_in_no_queue_goes_back_to_the_front_once(redis_server: RedisServer) -> None:
    """A worker popped the job and died before starting it: the record still says queued."""
    connection = redis.Redis.from_url(redis_server.url)
    queue = Queue(f"{new_namespace()}:model:echo", connection=connection, serializer=JSONSerializer)
    job = queue.enqueue(GENERATE_JOB, {"id": "x"}, ttl=120)
    waiting = queue.enqueue(GENERATE_JOB, {"id": "y"})

    async def attempt() -> tuple[bool, bool]:
        client = redis.asyncio.Redis.from_url(redis_server.url)
        try:
            requeuer = Requeuer(client)
            return await requeuer.missing(job.id, queue.key), await requeuer.requeue_unqueued(job.id, queue.key)
        finally:
            await client.aclose()

    # Still in its queue: nothing to do.
    assert asyncio.run(attempt()) == (False, False)
    assert queue.pop_job_id() == job.id  # the dying worker's pop
    assert asyncio.run(attempt()) == (True, True)
    assert queue.get_job_ids() == [job.id, waiting.id]
    # A second replica's check finds it queued again.
    assert asyncio.run(attempt()) == (False, False)

    # Started by a live worker meanwhile: never requeued, missing or not.
    connection.delete(queue.key)
    started = started_by_a_worker(connection, queue, "live-worker")
    assert asyncio.run(_requeue_unqueued(redis_server.url, started.id, queue.key)) is False
    assert started.id not in queue.get_job_ids()
    connection.close()


async def _requeue_unqueued(url: str, job_id: str, queue_key: str) -> bool:
    client = redis.asyncio.Redis.from_url(url)
    try:
        return await Requeuer(client).requeue_unqueued(job_id, queue_key)
    finally:
        await client.aclose()


@pytest.mark.parametrize("failures", [1, 3])
def test_a_job_handed_back_survives_a_redis_error(
    redis_server: RedisServer, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, failures: int
) -> None:
    """A worker that popped a job it will not run hands it back; a Redis error at that write is
    retried, and a job it cannot hand back is logged by id (the server's check requeues it)."""
    connection = redis.Redis.from_url(redis_server.url)
    queue = Queue(f"{new_namespace()}:model:echo", connection=connection, serializer=JSONSerializer)
    job = queue.enqueue(GENERATE_JOB, {"id": "x"})
    waiting = queue.enqueue(GENERATE_JOB, {"id": "y"})
    assert queue.pop_job_id() == job.id
    real_lpush, calls = connection.lpush, []

    def failing_lpush(*args: Any) -> Any:
        calls.append(args)
        if len(calls) <= failures:
            raise redis.ConnectionError("injected: connection reset")
        return real_lpush(*args)

    monkeypatch.setattr(connection, "lpush", failing_lpush)
    monkeypatch.setattr(worker, "_HAND_BACK_PAUSE", 0.0)
    with caplog.at_level(logging.WARNING, logger=worker.__name__):
        handed = worker.hand_back(connection, queue.key, job.id)

    assert len(calls) == min(failures + 1, 3)
    assert all(job.id in record.getMessage() for record in caplog.records) and len(caplog.records) == failures
    if failures < 3:
        assert handed and queue.get_job_ids() == [job.id, waiting.id]
    else:
        assert not handed and queue.get_job_ids() == [waiting.id]
        assert caplog.records[-1].levelno == logging.ERROR
        # The record stays queued in no queue: what the server's check requeues.
        assert asyncio.run(_requeue_unqueued(redis_server.url, job.id, queue.key))
        assert queue.get_job_ids() == [job.id, waiting.id]
    connection.close()


def test_a_batch_line_waiting_in_its_batch_queue_is_never_requeued(redis_server: RedisServer) -> None:
    """The stream checks look for a queued job in its own queue: a Batch API line waits in the
    model's batch queue, and looking for it in the interactive one put it on both (run twice)."""
    from ollm.contract import WorkerInfo
    from ollm.settings import Settings
    from server.dispatch import Dispatcher, QueueWatch

    namespace = new_namespace()
    settings = Settings.model_validate({"redis": {"url": redis_server.url, "namespace": namespace}})
    connection = redis.Redis.from_url(redis_server.url)
    batch = Queue(f"{namespace}:model-batch:echo", connection=connection, serializer=JSONSerializer)
    line = batch.enqueue(GENERATE_JOB, {"id": "line"}, ttl=120)

    async def checks() -> list[dict[str, Any] | None]:
        client = redis.asyncio.Redis.from_url(redis_server.url)
        try:
            dispatcher = Dispatcher(settings, connection, client)
            serving = WorkerInfo.model_validate({"name": "w", "host": "h", "pid": 1, "models": ["echo"]})

            async def workers() -> list[WorkerInfo]:
                return [serving]

            dispatcher.workers = workers  # type: ignore[method-assign]  # a live worker busy with others
            watch = QueueWatch()
            return [await dispatcher.check_job(line.id, "echo", watch=watch) for _ in range(3)]
        finally:
            await client.aclose()

    assert asyncio.run(checks()) == [None, None, None]
    assert batch.get_job_ids() == [line.id]
    assert Queue(f"{namespace}:model:echo", connection=connection).get_job_ids() == []
    connection.close()
