"""OpenAI's cursor pagination (``after`` an id, ``limit``, ``has_more``) read from a Redis sorted
set of ids by creation time: a page costs one rank look-up and one range, however many are stored."""

from __future__ import annotations

from typing import Any

import redis.asyncio

from ollm.errors import InvalidRequestError


async def page_ids(
    connection: redis.asyncio.Redis, index: str, after: str | None, limit: int, *, newest_first: bool
) -> tuple[list[str], bool]:
    """The ids of the ``limit`` entries after ``after`` (from the start without one) and whether
    more follow."""
    start = 0
    if after is not None:
        rank = await (connection.zrevrank if newest_first else connection.zrank)(index, after)
        if not isinstance(rank, int):  # None: not in the index
            raise InvalidRequestError(f"after: no listed object has the id {after[:64]!r}", param="after")
        start = rank + 1
    ids = [text(i) for i in await connection.zrange(index, start, start + limit, desc=newest_first)]
    return ids[:limit], len(ids) > limit


def text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else value
