"""A worker takes Batch API lines only after interactive work: queue order and batch slots."""

from __future__ import annotations

import threading
from collections.abc import Iterator

import fakeredis
import pytest
from rq import Queue
from rq.serializers import JSONSerializer

from ollm.contract import GENERATE_JOB, Keys
from workers.job import JobContext
from workers.worker import GenerationWorker

KEYS = Keys("wq")


@pytest.fixture
def worker() -> Iterator[GenerationWorker]:
    connection = fakeredis.FakeRedis()
    context = JobContext(connection, KEYS, {})
    queues = [name for model in ("a", "b") for name in (KEYS.queue(model), KEYS.batch_queue(model))]
    yield GenerationWorker(queues, connection, context, max_concurrency=4, heartbeat_seconds=1.0, batch_slots=1)
    context.close()


def names(worker: GenerationWorker) -> list[str]:
    return [queue.name for queue in worker.queues]


def test_batch_queues_come_after_every_interactive_queue(worker: GenerationWorker) -> None:
    own = KEYS.worker_queue(worker.name)
    assert names(worker) == [own, KEYS.queue("a"), KEYS.queue("b"), KEYS.batch_queue("a"), KEYS.batch_queue("b")]
    worker.served(["c"], True)  # a model loaded on demand: its batch queue goes last too
    assert names(worker) == [
        own, KEYS.queue("a"), KEYS.queue("b"), KEYS.queue("c"),
        KEYS.batch_queue("a"), KEYS.batch_queue("b"), KEYS.batch_queue("c"),
    ]  # fmt: skip
    worker.served(["a"], False)
    assert KEYS.queue("a") not in names(worker) and KEYS.batch_queue("a") not in names(worker)


def test_an_interactive_job_is_dequeued_before_an_earlier_batch_line(worker: GenerationWorker) -> None:
    batch = Queue(KEYS.batch_queue("b"), connection=worker.connection, serializer=JSONSerializer)
    interactive = Queue(KEYS.queue("b"), connection=worker.connection, serializer=JSONSerializer)
    batch.enqueue(GENERATE_JOB, {"model": "b"}, job_id="line")
    interactive.enqueue(GENERATE_JOB, {"model": "b"}, job_id="chat")
    first = worker.dequeue_job_and_maintain_ttl(1)
    second = worker.dequeue_job_and_maintain_ttl(1)
    assert first is not None and second is not None
    assert [first[0].id, second[0].id] == ["chat", "line"]


def test_with_its_batch_slots_taken_a_worker_leaves_batch_lines_queued(worker: GenerationWorker) -> None:
    batch = Queue(KEYS.batch_queue("a"), connection=worker.connection, serializer=JSONSerializer)
    interactive = Queue(KEYS.queue("a"), connection=worker.connection, serializer=JSONSerializer)
    batch.enqueue(GENERATE_JOB, {"model": "a"}, job_id="line-1")
    batch.enqueue(GENERATE_JOB, {"model": "a"}, job_id="line-2")
    first = worker.dequeue_job_and_maintain_ttl(1)
    assert first is not None and first[0].id == "line-1"
    worker._batch_running = 1  # line-1 runs in the worker's only batch slot

    taken: list[str] = []
    dequeuing = threading.Thread(target=lambda: taken.append(worker.dequeue_job_and_maintain_ttl(1)[0].id))  # type: ignore[index]
    dequeuing.start()
    dequeuing.join(timeout=2.5)  # the gated dequeue re-checks its slots every second meanwhile
    assert dequeuing.is_alive() and taken == [] and batch.job_ids == ["line-2"]
    interactive.enqueue(GENERATE_JOB, {"model": "a"}, job_id="chat")
    dequeuing.join(timeout=10)
    assert taken == ["chat"] and batch.job_ids == ["line-2"]


def test_more_than_one_batch_line_runs_only_while_no_interactive_request_does() -> None:
    connection = fakeredis.FakeRedis()
    context = JobContext(connection, KEYS, {})
    worker = GenerationWorker([KEYS.queue("a"), KEYS.batch_queue("a")], connection, context, 8, 1.0, batch_slots=3)
    try:
        assert worker._batch_open()  # idle
        worker._running = worker._batch_running = 2  # two batch lines, nothing else
        assert worker._batch_open()
        worker._running = 3  # and an interactive request: no third line now
        assert not worker._batch_open()
        worker._running = worker._batch_running = 3  # all batch slots taken
        assert not worker._batch_open()
        worker._running, worker._batch_running = 5, 0  # interactive work never keeps out the first line
        assert worker._batch_open()
    finally:
        context.close()
