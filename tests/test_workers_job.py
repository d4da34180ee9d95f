"""The job function's relay: engine events out on the job's channel, errors raised for RQ, and the
early start of a dequeued generation."""

from __future__ import annotations

import json
from typing import Any

import fakeredis
import pytest
import redis
from rq import Queue
from rq.job import Job
from rq.serializers import JSONSerializer

from ollm.contract import Keys
from ollm.engine.base import EventSink
from ollm.engine.echo import EchoEngine
from ollm.errors import GenerationFailedError, ModelNotFoundError
from ollm.generation import ChatMessage, ErrorEvent, ExecutionInfo, GenerationRequest
from workers.job import GENERATE_JOB, JobContext

KEYS = Keys("job")


def request(model: str = "echo", text: str = "a b c") -> GenerationRequest:
    return GenerationRequest(model=model, messages=[ChatMessage(role="user", content=text)])


class FailingEngine:
    info = ExecutionInfo(model="bad", backend="x", specialization_state="x", device="cpu", dtype="x")

    def submit(self, request: GenerationRequest, sink: EventSink) -> None:
        sink(ErrorEvent(message="prompt too long", status=400, code="context_length_exceeded"))

    def cancel(self, request_id: str) -> None: ...

    def ready(self) -> bool:
        return True

    def active(self) -> int:
        return 0

    def close(self) -> None: ...


def run(model: str, engines: dict[str, Any], marker: bool = False) -> tuple[Any, list[dict[str, Any]]]:
    sync = fakeredis.FakeRedis()
    pubsub = sync.pubsub(ignore_subscribe_messages=True)
    req = request(model)
    pubsub.subscribe(KEYS.events(req.id))
    if marker:
        sync.set(KEYS.cancelled(req.id), 1)
    context = JobContext(sync, KEYS, engines)
    outcome: Any
    try:
        outcome = context.generate(req)
    except Exception as exc:
        outcome = exc
    finally:
        context.close()
    messages: list[dict[str, Any]] = []
    while not messages or messages[-1]["type"] not in ("final", "error"):
        message = pubsub.get_message(timeout=1.0)  # None for the subscribe confirmation
        if message is not None:
            messages.append(json.loads(message["data"]))
    assert context.in_flight() == 0
    return outcome, messages


def test_events_are_published_in_order_and_the_final_returned() -> None:
    engine = EchoEngine(token_delay=0)
    final, messages = run("echo", {"echo": engine})
    engine.close()
    assert [m["type"] for m in messages] == ["token", "token", "token", "final"]
    assert final.text == "a b c" and messages[-1]["text"] == "a b c"


def test_a_cancel_that_came_while_queued_is_honoured() -> None:
    engine = EchoEngine(token_delay=0)
    final, messages = run("echo", {"echo": engine}, marker=True)
    engine.close()
    assert final.finish_reason == "cancelled" and [m["type"] for m in messages] == ["final"]


def test_engine_errors_are_published_once_and_raised() -> None:
    error, messages = run("bad", {"bad": FailingEngine()})
    assert isinstance(error, Exception) and "prompt too long" in str(error)
    assert messages == [
        {"type": "error", "message": "prompt too long", "status": 400, "code": "context_length_exceeded"}
    ]


def test_a_model_this_worker_does_not_serve() -> None:
    error, messages = run("other", {})
    assert isinstance(error, ModelNotFoundError)
    assert messages[0]["status"] == 404


@pytest.mark.parametrize(
    ("name", "payload"),
    [
        ("generate", {"model": "echo", "messages": [{"role": "user", "content": "x"}]}),
        ("embed", {"model": "m", "inputs": ["x"]}),
    ],
)
def test_job_functions_need_a_worker_process(name: str, payload: dict[str, Any]) -> None:
    from workers import job

    with pytest.raises(RuntimeError, match="ollm worker"):
        getattr(job, name)(payload)


class CountingEngine:
    """The echo engine, counting submits; ``ready`` as a keep-alive'd engine would say it."""

    def __init__(self, ready: bool = True) -> None:
        self.echo = EchoEngine(token_delay=0)
        self.info = self.echo.info
        self.submitted: list[str] = []
        self.cancelled: list[str] = []
        self._ready = ready

    def submit(self, request: GenerationRequest, sink: EventSink) -> None:
        self.submitted.append(request.id)
        self.echo.submit(request, sink)

    def cancel(self, request_id: str) -> None:
        self.cancelled.append(request_id)
        self.echo.cancel(request_id)

    def ready(self) -> bool:
        return self._ready

    def active(self) -> int:
        return self.echo.active()

    def close(self) -> None:
        self.echo.close()


def dequeued(sync: fakeredis.FakeRedis, req: GenerationRequest) -> Job:
    queue = Queue(KEYS.queue(req.model), connection=sync, serializer=JSONSerializer)
    queue.enqueue(GENERATE_JOB, req.model_dump(mode="json"), job_id=req.id)
    return Job.fetch(req.id, connection=sync, serializer=JSONSerializer)


def test_a_prestarted_run_is_taken_over_by_its_job_not_started_twice() -> None:
    sync = fakeredis.FakeRedis()
    engine = CountingEngine()
    context = JobContext(sync, KEYS, {"echo": engine})
    req = request()
    pubsub = sync.pubsub(ignore_subscribe_messages=True)
    pubsub.subscribe(KEYS.events(req.id))
    try:
        context.prestart(dequeued(sync, req))
        assert engine.submitted == [req.id] and context.in_flight() == 1
        final = context.generate(req)
        context.discard(req.id)  # what the worker does after every job: nothing left to cancel
    finally:
        context.close()
        engine.close()
    assert final.text == "a b c" and engine.submitted == [req.id] and engine.cancelled == []
    assert context.in_flight() == 0


def test_a_model_that_must_load_first_is_not_prestarted() -> None:
    sync = fakeredis.FakeRedis()
    engine = CountingEngine(ready=False)
    context = JobContext(sync, KEYS, {"echo": engine})
    try:
        context.prestart(dequeued(sync, request()))
        assert engine.submitted == [] and context.in_flight() == 0
    finally:
        context.close()
        engine.close()


def test_a_prestarted_run_whose_job_never_ran_is_cancelled() -> None:
    sync = fakeredis.FakeRedis()
    engine = CountingEngine()
    context = JobContext(sync, KEYS, {"echo": engine})
    req = request(text=" ".join(["w"] * 10_000))
    try:
        context.prestart(dequeued(sync, req))
        context.discard(req.id)
    finally:
        context.close()
        engine.close()
    assert engine.cancelled == [req.id] and context.in_flight() == 0


class NoPublish(fakeredis.FakeRedis):
    def pipeline(self, transaction: bool = True, shard_hint: Any = None) -> Any:
        raise redis.ConnectionError("Redis went away")


def test_events_that_cannot_be_published_fail_the_job() -> None:
    engine = EchoEngine(token_delay=0)
    context = JobContext(NoPublish(), KEYS, {"echo": engine})
    try:
        with pytest.raises(GenerationFailedError, match="could not publish"):
            context.generate(request())
    finally:
        context.close()
        engine.close()
    assert context.in_flight() == 0
