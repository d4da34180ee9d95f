"""The OpenAI suite talks to the session's real stack (``real_stack`` in tests/conftest.py: real
redis-server, one `ollm worker` serving the real default chat and embedding models, and `ollm serve`)
through the `openai` client."""

from __future__ import annotations

import openai
import pytest

from tests.integration.harness import Live


@pytest.fixture
def live(real_stack: Live) -> Live:
    return real_stack


@pytest.fixture
def client(live: Live) -> openai.OpenAI:
    return live.client()
