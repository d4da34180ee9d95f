"""One live stack for the Ollama API tests: the session's real redis-server, one `ollm worker` serving the real
default chat and embedding models, and `ollm serve` (processes from tests/integration/harness.py)."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import ollama
import pytest

from tests.conftest import DEFAULT_CHAT_MODEL, DEFAULT_EMBEDDING_MODEL
from tests.integration.harness import Server, Worker, new_namespace
from workers.redis_server import RedisServer


@dataclass
class OllamaStack:
    server: Server
    worker: Worker
    namespace: str
    redis_url: str

    @property
    def url(self) -> str:
        return self.server.url

    def client(self) -> ollama.Client:
        return ollama.Client(host=self.server.url, timeout=120)


@pytest.fixture(scope="module")
def stack(
    tmp_path_factory: pytest.TempPathFactory,
    redis_server: RedisServer,
    default_model_dir: Path,
    embedding_model_dir: Path,
) -> Iterator[OllamaStack]:
    """Started once per module: loading the model dominates, the tests themselves are short."""
    logs = tmp_path_factory.mktemp("ollama-stack")
    ns = new_namespace()
    worker = Worker(redis_server.url, ns, [DEFAULT_CHAT_MODEL, DEFAULT_EMBEDDING_MODEL], logs / "worker.log")
    server = Server(redis_server.url, ns, logs / "server.log")
    try:
        worker.wait_ready()
        server.wait_ready()
        yield OllamaStack(server, worker, ns, redis_server.url)
    finally:
        server.stop()
        worker.stop()
