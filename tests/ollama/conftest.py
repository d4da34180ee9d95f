"""The Ollama suite talks to the session's real stack (``real_stack`` in tests/conftest.py: real
redis-server, one `ollm worker` serving the real default chat and embedding models, and `ollm serve`)
through the official `ollama` client."""

from __future__ import annotations

from dataclasses import dataclass

import ollama
import pytest

from tests.integration.harness import Live, Server, Worker


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


@pytest.fixture
def stack(real_stack: Live) -> OllamaStack:
    return OllamaStack(real_stack.server, real_stack.worker, real_stack.namespace, real_stack.redis_url)
