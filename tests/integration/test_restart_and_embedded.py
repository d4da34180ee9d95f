"""State that outlives a server process, `ollm serve` running the whole stack itself, the API key."""

from __future__ import annotations

import asyncio
import signal
from pathlib import Path

import httpx
import psutil
import pytest
import redis.asyncio

from ollm.contract import Keys
from ollm.generation import ChatMessage
from ollm.settings import ServerSettings
from server.stores.responses import StoredResponse, response_store
from tests.integration.conftest import ServerFactory, Stack
from tests.integration.harness import OLLM, Process, base_env, free_port, new_namespace, wait_until
from workers.redis_server import RedisServer

pytestmark = pytest.mark.slow


def test_sessions_survive_a_server_restart_with_the_redis_backend(
    echo_stack: Stack, start_server: ServerFactory
) -> None:
    first = start_server(ns=echo_stack.namespace, OLLM_SERVER__SESSION_BACKEND="redis")
    with first.client() as client:
        session = client.post("/v1/sessions", json={"model": "echo"}).json()
        client.post(f"/v1/sessions/{session['id']}/prompt", json={"prompt": "remember me"}).raise_for_status()
    first.stop()

    second = start_server(ns=echo_stack.namespace, OLLM_SERVER__SESSION_BACKEND="redis")
    with second.client() as client:
        restored = client.get(f"/v1/sessions/{session['id']}").json()
        assert [m["content"] for m in restored["messages"]] == ["remember me", "remember me"]
        # And the conversation goes on from where it was.
        client.post(f"/v1/sessions/{session['id']}/prompt", json={"prompt": "again"}).raise_for_status()
        assert len(client.get(f"/v1/sessions/{session['id']}").json()["messages"]) == 4


def test_stored_responses_survive_a_restart_with_the_redis_backend(redis_server: RedisServer) -> None:
    keys = Keys(new_namespace())
    record = StoredResponse(
        id="resp_1",
        response={"id": "resp_1", "object": "response", "output_text": "hi"},
        input_items=[{"type": "message", "role": "user", "content": "hello"}],
        messages=[ChatMessage(role="user", content="hello"), ChatMessage(role="assistant", content="hi")],
    )

    async def write() -> None:
        connection = redis.asyncio.Redis.from_url(redis_server.url)
        await response_store(ServerSettings(), connection, keys).put("resp_1", record)
        await connection.aclose()

    async def read() -> StoredResponse | None:
        # A fresh connection and store: what a restarted (or another) server process has.
        connection = redis.asyncio.Redis.from_url(redis_server.url)
        try:
            return await response_store(ServerSettings(), connection, keys).get("resp_1")
        finally:
            await connection.aclose()

    asyncio.run(write())
    assert asyncio.run(read()) == record


def test_embedded_serve_runs_the_whole_stack_and_leaves_nothing_behind(tmp_path: Path) -> None:
    port = free_port()
    serve = Process(
        [*OLLM, "serve", "--model", "echo", "--workers", "2", "--port", str(port), "--log-level", "warning"],
        base_env(new_namespace(), TMPDIR=str(tmp_path), OLLM_REDIS__DATA_DIR=str(tmp_path / "data")),
        tmp_path / "serve.log",
    )
    try:
        url = f"http://127.0.0.1:{port}"

        def healthy() -> bool:
            assert serve.alive(), serve.output()
            try:
                return httpx.get(f"{url}/v1/health", timeout=2).json()["models"]["echo"]["workers"] == 2
            except (httpx.TransportError, KeyError):
                return False

        wait_until(healthy, 90, "the embedded stack", interval=0.2)
        body = {"model": "echo", "messages": [{"role": "user", "content": "all in one"}]}
        answer = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=30).json()
        assert answer["choices"][0]["message"]["content"] == "all in one"

        children = psutil.Process(serve.pid).children(recursive=True)
        names = " ".join(" ".join(c.cmdline()) for c in children)
        assert "redis-server" in names and names.count(" worker ") == 2
        assert any(p.name.startswith("ollm-redis-") for p in tmp_path.iterdir())

        assert serve.stop(timeout=30) in (0, 128 + signal.SIGTERM)
        wait_until(lambda: not any(c.is_running() and c.status() != "zombie" for c in children), 10, "children")
        assert not any(p.name.startswith("ollm-redis-") for p in tmp_path.iterdir())
    finally:
        # SIGTERM first, so that serve stops its Redis and workers even when the test failed.
        serve.stop(timeout=30)


def test_api_key_is_required_on_every_route_but_health(echo_stack: Stack, start_server: ServerFactory) -> None:
    server = start_server(ns=echo_stack.namespace, OLLM_SERVER__API_KEY="sekret")
    body = {"model": "echo", "messages": [{"role": "user", "content": "hi"}]}
    with server.client() as client:
        assert client.get("/v1/health").status_code == 200
        refused = client.post("/v1/chat/completions", json=body)
        assert refused.status_code == 401 and refused.json()["error"]["type"] == "authentication_error"
        assert client.get("/openapi.json").status_code == 401
        wrong = client.post("/v1/chat/completions", json=body, headers={"Authorization": "Bearer nope"})
        assert wrong.status_code == 401
        ok = client.post("/v1/chat/completions", json=body, headers={"Authorization": "Bearer sekret"})
        assert ok.status_code == 200

