"""`ollm serve` and `ollm worker` refuse unsafe or impossible set-ups before starting anything."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from cli.serve import is_loopback


@pytest.mark.parametrize(
    ("host", "loopback"),
    [("127.0.0.1", True), ("127.0.0.2", True), ("::1", True), ("localhost", True),
     ("0.0.0.0", False), ("::", False), ("192.168.1.10", False), ("example.com", False)],
)  # fmt: skip
def test_is_loopback(host: str, loopback: bool) -> None:
    assert is_loopback(host) is loopback


def test_serve_on_a_public_address_needs_an_api_key(cli: Callable[..., Any], clean_settings_env: Path) -> None:
    result = cli("serve", "--host", "0.0.0.0", "--redis-url", "redis://127.0.0.1:1/0")
    assert result.exit_code == 2
    assert "API key" in result.output and "OLLM_SERVER__API_KEY" in result.output


def test_worker_needs_a_redis_url(cli: Callable[..., Any], clean_settings_env: Path) -> None:
    result = cli("worker", "--model", "echo")
    assert result.exit_code == 2
    assert "--redis-url" in result.output
