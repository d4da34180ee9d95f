"""A live stack per test module (the OpenAI suite's ``Live``): real redis-server, one `ollm worker` serving
the real default chat model, and `ollm serve`; tests talk to it through the `anthropic` SDK."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import anthropic
import pytest

from tests.conftest import DEFAULT_CHAT_MODEL
from tests.openai.conftest import Live
from workers.redis_server import RedisServer


@pytest.fixture(scope="module")
def live(
    tmp_path_factory: pytest.TempPathFactory, redis_server: RedisServer, default_model_dir: Path
) -> Iterator[Live]:
    stack = Live(redis_server.url, tmp_path_factory.mktemp("anthropic-live"), [DEFAULT_CHAT_MODEL])
    try:
        yield stack.start()
    finally:
        stack.stop()


def sdk_client(url: str, **credentials: str) -> anthropic.Anthropic:
    """The official client as Claude Code's users point it at ollm (base URL, any key); no retries,
    so a failure shows."""
    return anthropic.Anthropic(base_url=url, max_retries=0, timeout=120, **(credentials or {"api_key": "unused"}))


@pytest.fixture
def client(live: Live) -> anthropic.Anthropic:
    return sdk_client(live.server.url)
