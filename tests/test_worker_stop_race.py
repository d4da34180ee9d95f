"""A SIGTERM that reaches a worker in the middle of RQ's dequeue never strands the job it popped.

RQ's dequeue pops the job id off its queue, then fetches the job and does its bookkeeping before
the job is started. A stop signal in that gap used to abort the dequeue: the job was then in no
queue and no registry, and its client waited until the request timeout. Here the signal is sent
from inside that gap, deterministically: right after the pop, before the job is fetched.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator
from typing import Any

import pytest
import redis
from rq import Queue
from rq.job import Job, JobStatus
from rq.serializers import JSONSerializer

from ollm.contract import GENERATE_JOB, Keys
from ollm.engine.echo import EchoEngine
from ollm.generation import ChatMessage, GenerationRequest
from tests.integration.harness import new_namespace
from workers.job import JobContext, install
from workers.redis_server import RedisServer
from workers.worker import GenerationWorker


@pytest.fixture
def restored_signals() -> Iterator[None]:
    # The worker installs its own SIGINT/SIGTERM handlers in this (pytest's) process.
    saved = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    yield
    for sig, handler in saved.items():
        signal.signal(sig, handler)


def test_sigterm_between_pop_and_start_still_runs_the_popped_job(
    redis_server: RedisServer, restored_signals: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    connection = redis.Redis.from_url(redis_server.url)
    keys = Keys(new_namespace())
    engine = EchoEngine(token_delay=0)
    context = JobContext(connection, keys, {"echo": engine})
    worker = GenerationWorker([keys.queue("echo")], connection, context, max_concurrency=2, heartbeat_seconds=1.0)
    queue = Queue(keys.queue("echo"), connection=connection, serializer=JSONSerializer)
    request = GenerationRequest(model="echo", messages=[ChatMessage(role="user", content="still served")])
    job = queue.enqueue(GENERATE_JOB, request.model_dump(mode="json"), job_id=request.id)

    fetch = Queue._fetch_dequeued_job.__func__  # type: ignore[attr-defined]
    signalled: list[str] = []

    def fetch_after_a_sigterm(cls: type[Queue], connection: Any, queue_key: str, job_id: str, **kwargs: Any) -> Any:
        # The id is off the queue now; the signal lands before the job is even fetched.
        if not signalled:
            signalled.append(job_id)
            os.kill(os.getpid(), signal.SIGTERM)
        return fetch(cls, connection, queue_key, job_id, **kwargs)

    monkeypatch.setattr(Queue, "_fetch_dequeued_job", classmethod(fetch_after_a_sigterm))
    install(context)
    try:
        # Returns once the signal has stopped it; teardown drains the job it had taken.
        worker.work(logging_level="WARNING")
    finally:
        install(None)
        context.close()
        engine.close()

    assert signalled == [job.id]
    job = Job.fetch(job.id, connection=connection, serializer=JSONSerializer)
    assert job.get_status() == JobStatus.FINISHED
    result = job.return_value()
    assert isinstance(result, dict) and result["text"] == "still served"
    assert queue.get_job_ids() == []
    connection.close()
