"""The server's side of keep-alive (workers/keep_alive.py is the other): record a client's
keep-alive for a model, ask workers to load or unload it now, and read what they hold in memory."""

from __future__ import annotations

import asyncio
import time
from typing import Any

from ollm.contract import KeepAlive, ResidencyMessage, WorkerInfo
from server.ollama.catalog import merge_reports
from server.ollama.serving import stamp
from server.services import Services

_POLL = 0.1


async def set_keep_alive(services: Services, model: str, seconds: float | None) -> None:
    """The keep-alive from this request on; it outlives the request so the workers can read it."""
    value = KeepAlive(seconds, stamp()).dumps()
    # Expires on its own a while after it stops mattering (a model idle that long is unloaded).
    ttl = None if seconds is None else int(seconds) + 24 * 3600
    await services.connection.set(services.keys.keep_alive(model), value, ex=ttl)


async def loaded_models(services: Services, workers: list[WorkerInfo] | None = None) -> dict[str, dict[str, Any]]:
    """Model name -> {names, size, loaded_at, expires_at} over every live worker."""
    if workers is None:
        workers = await services.dispatcher.workers()
    if not workers:
        return {}
    async with services.connection.pipeline(transaction=False) as pipe:
        for worker in workers:
            pipe.hgetall(services.keys.loaded(worker.host, worker.pid))
        raw = await pipe.execute()
    reports = [{_text(k): _text(v) for k, v in report.items()} for report in raw if report]
    return merge_reports(reports)


def is_loaded(reports: dict[str, dict[str, Any]], model: str) -> bool:
    return any(model == name or model in entry.get("names", []) for name, entry in reports.items())


async def request(services: Services, model: str, action: str, timeout: float) -> bool:
    """Ask the workers serving ``model`` to "load" or "unload" it; wait until one (load) or none
    (unload) reports it in memory. Returns False when that did not happen within ``timeout``."""
    want = action == "load"
    message = ResidencyMessage(model=model, action="load" if want else "unload").model_dump_json()
    await services.connection.publish(services.keys.residency_channel, message)
    deadline = time.monotonic() + timeout
    while True:
        if is_loaded(await loaded_models(services), model) == want:
            return True
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(_POLL)


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value
