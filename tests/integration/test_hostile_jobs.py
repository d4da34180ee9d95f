"""Whatever is found on a worker's queue fails that job, never the worker.

Jobs are written straight into Redis, as anything with access to it could: a payload that is not
a request, a job whose data cannot be decoded, a job naming a function that is not ollm's. After
each the same worker still answers a real request.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import redis
from rq import Queue
from rq.job import Job, JobStatus
from rq.serializers import JSONSerializer

from ollm.contract import Keys
from tests.integration.conftest import ServerFactory, WorkerFactory
from tests.integration.harness import wait_until
from workers.job import GENERATE_JOB
from workers.redis_server import RedisServer

pytestmark = pytest.mark.slow


def _ends_failed(connection: redis.Redis, job_id: str) -> bool:
    job = Job.fetch(job_id, connection=connection, serializer=JSONSerializer)
    return job.get_status(refresh=True) == JobStatus.FAILED


def test_malformed_jobs_fail_alone_and_the_worker_keeps_serving(
    redis_server: RedisServer,
    namespace: str,
    start_worker: WorkerFactory,
    start_server: ServerFactory,
    tmp_path: Path,
) -> None:
    worker = start_worker("echo")
    server = start_server()
    connection = redis.Redis.from_url(redis_server.url)
    queue = Queue(Keys(namespace).queue("echo"), connection=connection, serializer=JSONSerializer)
    marker = tmp_path / "ran"
    hostile = [
        queue.enqueue(GENERATE_JOB, {"model": "echo", "messages": "not a list", "max_new_tokens": -5}),
        queue.enqueue(GENERATE_JOB, "not even an object"),
        queue.enqueue(GENERATE_JOB),
        # Not ollm's function: a worker runs only its own two jobs, whatever is named.
        queue.enqueue("pathlib.Path.touch", str(marker)),
    ]
    undecodable = queue.enqueue(GENERATE_JOB, {"model": "echo"})
    connection.hset(undecodable.key, "data", b"\x00\xffnot json")
    for job in [*hostile, undecodable]:
        wait_until(lambda job=job: _ends_failed(connection, job.id), 30, f"job {job.id} to fail")
    assert not marker.exists()
    foreign = Job.fetch(hostile[-1].id, connection=connection, serializer=JSONSerializer)
    assert "'pathlib.Path.touch' is not an ollm job" in (foreign.latest_result().exc_string or "")
    # A request after them, served by the same worker, which is still alive after it: whatever
    # the hostile jobs did to it has had its chance to take it down.
    with server.client() as client:
        body = {"model": "echo", "messages": [{"role": "user", "content": "still here"}]}
        answer = client.post("/v1/chat/completions", json=body)
        assert answer.status_code == 200, answer.text
        assert answer.json()["choices"][0]["message"]["content"] == "still here"
    assert worker.alive(), worker.output()
    connection.close()
