"""OpenAI's cursor pagination (``after`` an id, ``limit``, ``has_more``) over an ordered list."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TypeVar

from ollm.errors import InvalidRequestError

T = TypeVar("T")


def page(items: Sequence[T], id_of: Callable[[T], str], after: str | None, limit: int) -> tuple[list[T], bool]:
    """The ``limit`` items after the one whose id is ``after`` (from the start without one), and
    whether more follow. ``items`` are already in the order the list is read in."""
    start = 0
    if after is not None:
        ids = [id_of(item) for item in items]
        if after not in ids:
            raise InvalidRequestError(f"after: no listed object has the id {after[:64]!r}", param="after")
        start = ids.index(after) + 1
    return list(items[start : start + limit]), start + limit < len(items)
