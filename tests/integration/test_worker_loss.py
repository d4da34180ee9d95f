"""A worker killed before it streamed a token costs its clients time, never their answer."""

from __future__ import annotations

import threading
import time
from typing import Any

import httpx
import pytest
import redis
from rq.registry import FailedJobRegistry, FinishedJobRegistry, StartedJobRegistry
from rq.serializers import JSONSerializer

from tests.integration.conftest import ServerFactory, WorkerFactory
from tests.integration.harness import Server, json_events, wait_until
from workers.redis_server import RedisServer

pytestmark = pytest.mark.slow

LOST_AFTER = 2.0


def stream_chat(server: Server, text: str, into: dict[str, Any]) -> None:
    """One streaming chat request: its text, any error and when it ended, in ``into``."""
    body = {"model": "echo", "stream": True, "messages": [{"role": "user", "content": text}]}
    pieces: list[str] = []
    with httpx.stream("POST", f"{server.url}/v1/chat/completions", json=body, timeout=60) as response:
        into["status"] = response.status_code
        for _, event in json_events(response.iter_lines()):
            if event == "[DONE]":
                break
            if "error" in event:
                into["error"] = event["error"]
            elif event["choices"]:
                pieces.append(event["choices"][0]["delta"].get("content") or "")
    into["text"] = "".join(pieces)
    into["ended"] = time.monotonic()


def chat(server: Server, text: str, into: dict[str, Any]) -> None:
    body = {"model": "echo", "messages": [{"role": "user", "content": text}]}
    response = httpx.post(f"{server.url}/v1/chat/completions", json=body, timeout=60)
    into["status"] = response.status_code
    into["text"] = response.json()["choices"][0]["message"]["content"] if response.status_code == 200 else None
    into["ended"] = time.monotonic()


def test_requests_a_killed_worker_had_not_started_streaming_are_served_by_another(
    start_worker: WorkerFactory, start_server: ServerFactory, redis_server: RedisServer, namespace: str
) -> None:
    # The doomed worker takes a decode step every 60 s: requests it dequeues wait that long for
    # their first token, a window in which it is killed (after a second worker has started, which
    # takes seconds on a busy machine; the kill comes long before the step, so the window costs
    # no time). It holds four at most.
    doomed = start_worker("echo", OLLM_ECHO_TOKEN_DELAY="60", OLLM_WORKER__MAX_BATCH="4")
    server = start_server(OLLM_SERVER__WORKER_LOST_SECONDS=str(LOST_AFTER))
    connection = redis.Redis.from_url(redis_server.url, decode_responses=True)

    # The first request streams its first token at once, then waits for the next step.
    streaming: dict[str, Any] = {}
    body = {"model": "echo", "stream": True, "messages": [{"role": "user", "content": "already streaming here"}]}
    with httpx.stream("POST", f"{server.url}/v1/chat/completions", json=body, timeout=60) as response:
        events = json_events(response.iter_lines())
        first = next(e for _, e in events if e["choices"] and e["choices"][0]["delta"].get("content"))
        streaming["id"] = first["id"].removeprefix("chatcmpl-")

        texts = [" ".join(f"{n}-{i}" for i in range(30)) for n in ("a", "b", "c")]
        not_started: list[dict[str, Any]] = [{} for _ in texts]
        threads = [
            threading.Thread(target=stream_chat, args=(server, texts[0], not_started[0])),
            threading.Thread(target=stream_chat, args=(server, texts[1], not_started[1])),
            threading.Thread(target=chat, args=(server, texts[2], not_started[2])),
        ]
        for thread in threads:
            thread.start()

        def dequeued_by_doomed() -> bool:
            ids = connection.smembers(f"rq:worker:{doomed.registered_name()}:executions")
            return len(ids) == 4

        wait_until(dequeued_by_doomed, 5, "the doomed worker to take all four requests")
        # A second worker, and more load on it, before the kill.
        start_worker("echo", OLLM_ECHO_TOKEN_DELAY="0.02")
        later_texts = [" ".join(f"{n}-{i}" for i in range(20)) for n in ("d", "e", "f", "g")]
        later: list[dict[str, Any]] = [{} for _ in later_texts]
        later_threads = [
            threading.Thread(target=stream_chat, args=(server, text, result))
            for text, result in zip(later_texts, later, strict=True)
        ]
        for thread in later_threads:
            thread.start()
        assert not any("status" in result for result in not_started), "no header before the first token"

        doomed.kill9()
        killed_at = time.monotonic()
        rest = [e for _, e in events]
        noticed_after = time.monotonic() - killed_at
        for thread in threads + later_threads:
            thread.join(timeout=60)

    # The request that was already streaming ends with the error event.
    errors = [e["error"] for e in rest if isinstance(e, dict) and "error" in e]
    assert errors and errors[0]["code"] == "worker_lost", rest[-3:]
    # The others just took longer: every one has its whole answer.
    for text, result in zip(texts + later_texts, not_started + later, strict=True):
        assert result["status"] == 200 and "error" not in result, result
        assert result["text"] == text
    print(
        "requeue: kill -> answers complete in "
        + ", ".join(f"{r['ended'] - killed_at:.2f}s" for r in not_started)
        + f"; the streaming one got worker_lost after {noticed_after:.2f}s (worker_lost_seconds={LOST_AFTER:g})"
    )

    # RQ's registries say what happened: one failure, nothing left started. A worker moves a job
    # from started to finished after it published the job's last event, which the client may have
    # read first: wait for the bookkeeping of the last one.
    queue = f"{namespace}:model:echo"
    failed = FailedJobRegistry(queue, connection=connection, serializer=JSONSerializer).get_job_ids()
    assert failed == [streaming["id"]]
    started = StartedJobRegistry(queue, connection=connection, serializer=JSONSerializer)
    finished = FinishedJobRegistry(queue, connection=connection, serializer=JSONSerializer)
    wait_until(lambda: not started.get_job_ids(), 10, "the last job to leave RQ's started registry")
    assert len(finished.get_job_ids()) == 7
    connection.close()


def test_a_job_popped_by_a_worker_that_died_before_starting_it_is_served(
    start_worker: WorkerFactory, start_server: ServerFactory, redis_server: RedisServer, namespace: str
) -> None:
    # One slot, held by a long answer: the live worker is not dequeuing while the test plays a
    # worker that pops the next job off the queue and dies before starting it (kill -9, a cold
    # stop). Nothing about the job then says it ever left the queue: its record is "queued".
    start_worker("echo", OLLM_ECHO_TOKEN_DELAY="0.05", OLLM_WORKER__MAX_BATCH="1")
    server = start_server(OLLM_SERVER__WORKER_LOST_SECONDS=str(LOST_AFTER))
    connection = redis.Redis.from_url(redis_server.url, decode_responses=True)
    queue_key = f"rq:queue:{namespace}:model:echo"

    long_answer: dict[str, Any] = {}
    holder = threading.Thread(target=chat, args=(server, " ".join(f"w{i}" for i in range(80)), long_answer))
    holder.start()
    started = f"rq:wip:{namespace}:model:echo"
    wait_until(lambda: connection.llen(queue_key) == 0 and connection.zcard(started), 30, "the slot to be taken")

    stranded: dict[str, Any] = {}
    client = threading.Thread(target=chat, args=(server, "stranded no more", stranded))
    client.start()
    popped = connection.blpop([queue_key], timeout=30)  # the dying worker's pop
    assert popped is not None
    job_id = str(popped[1])
    popped_at = time.monotonic()
    wait_until(lambda: connection.lpos(queue_key, job_id) is not None, 30, "the job to be requeued")
    requeued_after = time.monotonic() - popped_at
    client.join(timeout=60)
    holder.join(timeout=60)

    assert stranded["status"] == 200 and stranded["text"] == "stranded no more"
    assert long_answer["status"] == 200
    print(
        f"job popped by a dead worker back in its queue after {requeued_after:.2f}s (worker_lost_seconds={LOST_AFTER})"
    )
    connection.close()
