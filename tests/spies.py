"""Seeing what reaches a model's methods without changing what they do."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import pytest


def spy(monkeypatch: pytest.MonkeyPatch, owner: type, name: str, record: Callable[..., None]) -> None:
    """Show every call of ``owner.name`` to ``record`` (same arguments) before it runs.

    ``functools.wraps`` keeps the signature: ``generate`` routes keyword arguments by inspecting it.
    """
    original = getattr(owner, name)

    @functools.wraps(original)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        record(*args, **kwargs)
        return original(*args, **kwargs)

    monkeypatch.setattr(owner, name, wrapper)
