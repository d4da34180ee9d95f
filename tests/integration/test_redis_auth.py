"""A Redis that wants credentials, as on several hosts: a password, or an ACL user with its own."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest

from tests.integration.conftest import ServerFactory, WorkerFactory
from tests.integration.harness import free_port, new_namespace
from workers.redis_server import RedisServer

pytestmark = pytest.mark.slow

PASSWORD = "default-p@ss:word"
# What docs/deployment.md suggests for ollm's own user: every key and channel, no admin commands.
ACL_USER = ["--user", "ollm", "on", ">ollm-secret", "~*", "&*", "+@all", "-@dangerous"]


@pytest.fixture(scope="module")
def guarded_redis() -> Iterator[RedisServer]:
    server = RedisServer(port=free_port(), password=PASSWORD, args=ACL_USER).start()
    yield server
    server.stop()


def _chat(url: str, text: str) -> httpx.Response:
    body = {"model": "echo", "messages": [{"role": "user", "content": text}]}
    return httpx.post(f"{url}/v1/chat/completions", json=body, timeout=60)


@pytest.mark.parametrize("who", ["password", "acl-user"])
def test_server_and_worker_work_through_redis_credentials(
    guarded_redis: RedisServer, start_worker: WorkerFactory, start_server: ServerFactory, who: str
) -> None:
    url = guarded_redis.url
    if who == "acl-user":
        url = f"redis://ollm:ollm-secret@127.0.0.1:{guarded_redis.port}/0"
    ns = new_namespace()
    start_worker("echo", redis_url=url, ns=ns)
    server = start_server(redis_url=url, ns=ns)
    answer = _chat(server.url, f"through {who}")
    assert answer.status_code == 200, answer.text
    assert answer.json()["choices"][0]["message"]["content"] == f"through {who}"
    # A stored response: the server's own store uses the same credentials.
    client = server.openai_client()
    stored = client.responses.create(model="echo", input="keep", store=True)
    assert client.responses.retrieve(stored.id).output_text == "keep"


def test_wrong_credentials_are_a_503_that_names_the_problem(
    guarded_redis: RedisServer, start_server: ServerFactory
) -> None:
    server = start_server(redis_url=f"redis://ollm:wrong@127.0.0.1:{guarded_redis.port}/0", ns=new_namespace())
    health = httpx.get(f"{server.url}/v1/health", timeout=30)
    assert health.status_code == 503
    assert health.json()["redis"]["status"] == "unavailable"
    answer = _chat(server.url, "refused")
    assert answer.status_code == 503, answer.text
    assert "wrong" not in answer.text  # the password is not echoed back
