"""The Anthropic suite talks to the session's real stack (``real_stack`` in tests/conftest.py: real
redis-server, one `ollm worker` serving the real default models, and `ollm serve`) through the
`anthropic` SDK."""

from __future__ import annotations

import anthropic
import pytest

from tests.integration.harness import Live


@pytest.fixture
def live(real_stack: Live) -> Live:
    return real_stack


def sdk_client(url: str, **credentials: str) -> anthropic.Anthropic:
    """The official client as Claude Code's users point it at ollm (base URL, any key); no retries,
    so a failure shows."""
    return anthropic.Anthropic(base_url=url, max_retries=0, timeout=120, **(credentials or {"api_key": "unused"}))


@pytest.fixture
def client(live: Live) -> anthropic.Anthropic:
    return sdk_client(live.server.url)
