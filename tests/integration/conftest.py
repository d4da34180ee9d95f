"""Fixtures that own the real processes of the serving tests (see harness.py)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.integration.harness import Server, Worker, new_namespace, stop_all
from workers.redis_server import RedisServer


@pytest.fixture
def namespace() -> str:
    return new_namespace()


WorkerFactory = Callable[..., Worker]
ServerFactory = Callable[..., Server]


@pytest.fixture
def start_worker(tmp_path: Path, redis_server: RedisServer, namespace: str) -> Iterator[WorkerFactory]:
    started: list[Worker] = []

    def start(
        *models: str, redis_url: str | None = None, ns: str | None = None, wait: bool = True, **env: str
    ) -> Worker:
        # No models: a worker that pins nothing and loads what requests ask for.
        log = tmp_path / f"worker{len(started)}.log"
        worker = Worker(redis_url or redis_server.url, ns or namespace, list(models), log, **env)
        started.append(worker)
        return worker.wait_ready() if wait else worker

    yield start
    stop_all(started)


@pytest.fixture
def start_server(tmp_path: Path, redis_server: RedisServer, namespace: str) -> Iterator[ServerFactory]:
    started: list[Server] = []

    def start(redis_url: str | None = None, ns: str | None = None, **env: str) -> Server:
        log = tmp_path / f"server{len(started)}.log"
        server = Server(redis_url or redis_server.url, ns or namespace, log, **env)
        started.append(server)
        return server.wait_ready()

    yield start
    stop_all(started)


class Stack:
    """A server and one echo worker sharing a namespace, for the tests that only read from them."""

    def __init__(self, server: Server, worker: Worker, namespace: str, redis_url: str) -> None:
        self.server = server
        self.worker = worker
        self.namespace = namespace
        self.redis_url = redis_url


@pytest.fixture(scope="session")
def echo_stack(tmp_path_factory: pytest.TempPathFactory, redis_server: RedisServer) -> Iterator[Stack]:
    """Started once: process start-up dominates these tests. Tests that need another server (or
    another model) on the same echo worker start it in ``echo_stack.namespace``; tests that break
    things (kill a worker, stop Redis) use processes of their own."""
    ns = new_namespace()
    logs = tmp_path_factory.mktemp("echo-stack")
    # 20 ms per token: slow enough to disconnect mid-stream, fast enough for short prompts.
    worker = Worker(redis_server.url, ns, ["echo"], logs / "worker.log", OLLM_ECHO_TOKEN_DELAY="0.02")
    server = Server(redis_server.url, ns, logs / "server.log", OLLM_SERVER__WORKER_LOST_SECONDS="2")
    try:
        worker.wait_ready()
        server.wait_ready()
        yield Stack(server, worker, ns, redis_server.url)
    finally:
        stop_all([server, worker])
