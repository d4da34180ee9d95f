"""Running several generations for one OpenAI request (``n`` choices, a list of prompts)."""

from __future__ import annotations

import asyncio

from ollm.generation import GenerationRequest
from server.dispatch import Completed, Disconnected, Dispatcher


async def generate_all(
    dispatcher: Dispatcher, requests: list[GenerationRequest], disconnected: Disconnected | None = None
) -> list[Completed]:
    """All requests at once, so the worker batches them; the first failure cancels the rest (their
    jobs are cancelled as their streams close) and is raised."""
    if len(requests) == 1:
        return [await dispatcher.generate(requests[0], disconnected)]
    try:
        async with asyncio.TaskGroup() as group:
            tasks = [group.create_task(dispatcher.generate(request, disconnected)) for request in requests]
    except BaseExceptionGroup as failed:
        # The task group wraps what failed; the client is owed the error itself (a 404 for an
        # unknown model, not a 500 "unhandled errors in a TaskGroup").
        raise _first_leaf(failed) from None
    return [task.result() for task in tasks]


def _first_leaf(group: BaseExceptionGroup[BaseException]) -> BaseException:
    first = group.exceptions[0]
    return _first_leaf(first) if isinstance(first, BaseExceptionGroup) else first
