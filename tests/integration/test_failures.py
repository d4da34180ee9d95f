"""What a client sees when things break: a worker killed mid-stream, Redis going away."""

from __future__ import annotations

import signal
import threading
import time
from typing import Any

import httpx
import pytest
import redis
from rq.registry import FailedJobRegistry
from rq.serializers import JSONSerializer

from tests.integration.conftest import ServerFactory, WorkerFactory
from tests.integration.harness import free_port, json_events, wait_until
from workers.redis_server import RedisServer

pytestmark = pytest.mark.slow

LOST_AFTER = 2.0


def test_worker_killed_mid_stream_ends_the_request_cleanly(
    start_worker: WorkerFactory, start_server: ServerFactory, redis_server: RedisServer, namespace: str
) -> None:
    worker = start_worker("echo", OLLM_ECHO_TOKEN_DELAY="0.05")
    server = start_server(OLLM_SERVER__WORKER_LOST_SECONDS=str(LOST_AFTER))
    words = " ".join(f"w{i}" for i in range(400))  # 20 s if the worker lived
    blocking: dict[str, Any] = {}

    def non_streaming() -> None:
        body = {"model": "echo", "prompt": words}
        blocking["response"] = httpx.post(f"{server.url}/v1/prompt", json=body, timeout=30)

    body = {"model": "echo", "stream": True, "messages": [{"role": "user", "content": words}]}
    with server.client() as client, client.stream("POST", "/v1/chat/completions", json=body) as response:
        events = json_events(response.iter_lines())
        first = next(e for _, e in events if e["choices"] and e["choices"][0]["delta"].get("content"))
        other = threading.Thread(target=non_streaming)
        other.start()
        wait_until(lambda: worker_in_flight(redis_server.url, namespace) == 2, 5, "both requests to run")
        worker.kill9()
        killed_at = time.monotonic()
        rest = [e for _, e in events]
        noticed_after = time.monotonic() - killed_at
    other.join(timeout=30)

    errors = [e["error"] for e in rest if isinstance(e, dict) and "error" in e]
    assert errors and errors[0]["code"] == "worker_lost", rest[-3:]
    assert rest[-1] == "[DONE]"
    assert noticed_after < LOST_AFTER + 2.0, noticed_after
    answer = blocking["response"]
    assert answer.status_code == 503 and answer.json()["error"]["code"] == "worker_lost"

    connection = redis.Redis.from_url(redis_server.url)
    try:
        failed = FailedJobRegistry(f"{namespace}:model:echo", connection=connection, serializer=JSONSerializer)
        assert first["id"].removeprefix("chatcmpl-") in failed.get_job_ids()
        assert len(failed.get_job_ids()) == 2
    finally:
        connection.close()


def worker_in_flight(redis_url: str, namespace: str) -> int:
    connection = redis.Redis.from_url(redis_url, decode_responses=True)
    try:
        return sum(
            int(connection.hget(f"{namespace}:worker:{name}", "in_flight") or 0)
            for name in connection.smembers(f"{namespace}:workers")
        )
    finally:
        connection.close()


def test_redis_outage_gives_503_and_service_resumes(
    start_worker: WorkerFactory, start_server: ServerFactory
) -> None:
    own = RedisServer(port=free_port()).start()
    try:
        worker = start_worker("echo", redis_url=own.url)
        server = start_server(redis_url=own.url)
        body = {"model": "echo", "messages": [{"role": "user", "content": "are you there"}]}
        with server.client() as client:
            assert client.post("/v1/chat/completions", json=body).status_code == 200

            own.stop_process()
            down = client.post("/v1/chat/completions", json=body)
            assert down.status_code == 503
            assert "Redis" in down.json()["error"]["message"]
            health = client.get("/v1/health")
            assert health.status_code == 503 and health.json()["redis"]["status"] == "unavailable"

            own.start()

            def answered() -> bool:
                return client.post("/v1/chat/completions", json=body).status_code == 200

            wait_until(answered, 20, "service to resume after Redis came back", interval=0.5)

            # The restarted Redis is empty: the worker's registration returns with its next beat,
            # which a loaded machine may run after the first answer has already gone through.
            def registered() -> bool:
                return client.get("/v1/health").json()["models"].get("echo", {}).get("workers") == 1

            wait_until(registered, 10, "the worker to register again", interval=0.2)

        # A worker whose Redis is gone still stops on SIGTERM (RQ alone would retry forever).
        own.stop_process()
        worker.terminate()
        assert worker.popen.wait(timeout=10) == 0
    finally:
        own.stop()


def test_a_worker_stopping_finishes_its_requests_and_takes_no_new_ones(
    start_worker: WorkerFactory, start_server: ServerFactory
) -> None:
    worker = start_worker("echo", OLLM_ECHO_TOKEN_DELAY="0.02")
    server = start_server(OLLM_SERVER__WORKER_LOST_SECONDS=str(LOST_AFTER))
    words = " ".join(f"w{i}" for i in range(200))  # 4 s: longer than the lost-worker bound
    body = {"model": "echo", "stream": True, "messages": [{"role": "user", "content": words}]}
    with server.client() as client, client.stream("POST", "/v1/chat/completions", json=body) as response:
        events = json_events(response.iter_lines())
        next(e for _, e in events if e["choices"] and e["choices"][0]["delta"].get("content"))
        worker.popen.send_signal(signal.SIGTERM)
        signalled = time.monotonic()
        # Draining, it advertises no models, and the server routes by that once it has read the
        # registrations again (the health route reads them fresh).
        wait_until(
            lambda: "echo" not in httpx.get(f"{server.url}/v1/health", timeout=10).json()["models"],
            10,
            "the server to see the stopping worker advertise no models",
        )
        refused = httpx.post(
            f"{server.url}/v1/chat/completions",
            json={"model": "echo", "messages": [{"role": "user", "content": "hi"}]},
            timeout=10,
        )
        rest = [e for _, e in events]
    assert refused.status_code == 503
    finish = [e["choices"][0]["finish_reason"] for e in rest if isinstance(e, dict) and e.get("choices")]
    assert finish[-1] == "stop", rest[-3:]
    assert not any(isinstance(e, dict) and "error" in e for e in rest)
    assert worker.popen.wait(timeout=15) == 0
    print(f"worker drain: SIGTERM -> worker exit {time.monotonic() - signalled:.2f}s, its stream whole")
