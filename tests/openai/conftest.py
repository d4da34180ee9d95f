"""A live stack per test module: real redis-server, one `ollm worker` serving the real default chat
and embedding models, and `ollm serve`; tests talk to it through the `openai` client."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import openai
import pytest

from tests.conftest import DEFAULT_CHAT_MODEL, DEFAULT_EMBEDDING_MODEL
from tests.integration.harness import Server, Worker, new_namespace
from workers.redis_server import RedisServer


class Live:
    """The processes of one stack; ``restart_server`` replaces `ollm serve` over the same Redis."""

    def __init__(self, redis_url: str, logs: Path, models: list[str], **server_env: str) -> None:
        self.redis_url = redis_url
        self.logs = logs
        self.namespace = new_namespace()
        self.server_env = server_env
        # Seeded n=2 choices run side by side in whatever batch they land in: only the batch-invariant
        # mode promises the same tokens whatever the batch holds (docs/engine.md).
        self.workers = [
            Worker(redis_url, self.namespace, models, logs / "worker.log", OLLM_RUNTIME__BATCH_INVARIANT="true")
        ]
        self.server = Server(redis_url, self.namespace, logs / "server0.log", **server_env)
        self.restarts = 0

    def start(self) -> Live:
        self.server.wait_ready()
        self.workers[0].wait_ready(timeout=300)
        return self

    def add_worker(self, models: list[str], **env: str) -> Worker:
        worker = Worker(self.redis_url, self.namespace, models, self.logs / f"worker{len(self.workers)}.log", **env)
        self.workers.append(worker)
        return worker.wait_ready()

    def restart_server(self) -> None:
        self.server.stop()
        self.restarts += 1
        log = self.logs / f"server{self.restarts}.log"
        self.server = Server(self.redis_url, self.namespace, log, **self.server_env).wait_ready()

    def client(self) -> openai.OpenAI:
        return self.server.openai_client()

    def stop(self) -> None:
        self.server.stop()
        for worker in self.workers:
            worker.stop()


@pytest.fixture(scope="module")
def live(
    tmp_path_factory: pytest.TempPathFactory,
    redis_server: RedisServer,
    default_model_dir: Path,
    embedding_model_dir: Path,
) -> Iterator[Live]:
    stack = Live(
        redis_server.url, tmp_path_factory.mktemp("openai-live"), [DEFAULT_CHAT_MODEL, DEFAULT_EMBEDDING_MODEL],
        OLLM_SERVER__WORKER_LOST_SECONDS="2",
    )  # fmt: skip
    try:
        yield stack.start()
    finally:
        stack.stop()


@pytest.fixture
def client(live: Live) -> openai.OpenAI:
    """Per test: a test may have restarted the server, which listens on a new port."""
    return live.client()
