"""The job function's relay: engine events out on the job's channel, errors raised for RQ."""

from __future__ import annotations

import json
from typing import Any

import fakeredis
import pytest

from ollm.engine.base import EventSink
from ollm.engine.echo import EchoEngine
from ollm.errors import ModelNotFoundError
from ollm.generation import ChatMessage, ErrorEvent, ExecutionInfo, GenerationRequest
from workers.job import JobContext
from workers.keys import Keys

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
