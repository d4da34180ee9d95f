"""`ollm serve` (the HTTP server, plus a private Redis and workers when no Redis URL is set) and
`ollm worker` (an RQ worker holding models in memory)."""

from __future__ import annotations

import ipaddress
import json
import logging
import math
import os
import signal
import sys
import time
from types import FrameType
from typing import Annotated, Any, NoReturn

import typer

from cli.main import app
from cli.options import fail, settings_or_exit
from ollm.errors import OllmError
from ollm.settings import Settings

HostOption = Annotated[str | None, typer.Option("--host", help="Address to bind (default 127.0.0.1).")]
PortOption = Annotated[int | None, typer.Option("--port", help="Port to bind (default 8000).")]
LogLevelOption = Annotated[
    str | None, typer.Option("--log-level", help="critical, error, warning, info, debug or trace.")
]
RedisUrlOption = Annotated[
    str | None, typer.Option("--redis-url", help="redis://host:port/db or unix:///path; unset: private Redis.")
]
ModelsOption = Annotated[
    list[str] | None,
    typer.Option(
        "--model", "-m", help="Model to load at start and pin; repeat for several (default: none, load on demand)."
    ),
]


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _raise_exit(signum: int, frame: FrameType | None) -> None:
    # SIGTERM must unwind through `finally` so the embedded workers drain and Redis is stopped. A
    # stop that was asked for, done cleanly, is a success (status 0) for systemd and supervisors.
    raise SystemExit(0)


@app.command()
def serve(
    host: HostOption = None,
    port: PortOption = None,
    log_level: LogLevelOption = None,
    reload: Annotated[bool | None, typer.Option("--reload/--no-reload", help="Restart on code changes.")] = None,
    workers: Annotated[
        int | None, typer.Option("--workers", help="Worker processes to start when no Redis URL is set.")
    ] = None,
    redis_url: RedisUrlOption = None,
    model: Annotated[str | None, typer.Option("--model", "-m", help="Model the embedded workers serve.")] = None,
    ephemeral: Annotated[
        bool | None,
        typer.Option("--ephemeral", help="Embedded mode: keep nothing on disk (stored responses, sessions, ...)."),
    ] = None,
) -> None:
    """Serve the HTTP API. With no Redis URL, also run a private Redis and `--workers` workers."""
    settings = settings_or_exit(
        {
            "server": {"host": host, "port": port, "log_level": log_level, "reload": reload, "workers": workers},
            "redis": {"url": redis_url, "ephemeral": ephemeral},
            "runtime": {"model_reference": model},
        }
    )
    server = settings.server
    if not is_loopback(server.host) and not server.api_key:
        fail(
            f"refusing to bind {server.host}: a non-loopback address needs an API key. Set "
            "OLLM_SERVER__API_KEY (or [server] api_key in ollm.toml); clients then send "
            "`Authorization: Bearer <key>`.",
            code=2,
        )
    logging.basicConfig(level=server.log_level.upper() if server.log_level != "trace" else "DEBUG")
    signal.signal(signal.SIGTERM, _raise_exit)
    stack = None
    try:
        if settings.redis.url is None:
            from workers.supervisor import EmbeddedStack

            reference = settings.runtime.model_reference
            data_dir = None if settings.redis.ephemeral else settings.redis.resolved_data_dir()
            kept = "keeping nothing (--ephemeral)" if data_dir is None else f"data in {data_dir}"
            typer.echo(
                f"starting a private Redis ({kept}) and {server.workers} worker(s) for {reference} "
                "(other models load on first use)"
            )
            # Assigned before starting, so a signal during start-up still cleans up what was started.
            budget = settings.worker.memory_budget
            stack = EmbeddedStack(
                reference, server.workers, settings.redis.namespace, server.log_level, data_dir,
                memory_budget=None if budget is None else int(budget),
                drain_seconds=settings.worker.drain_seconds,
            )  # fmt: skip
            stack.start()
            settings.redis.url = stack.url
        _run_uvicorn(settings)
    except OllmError as exc:
        fail(str(exc))
    except SystemExit as stopped:
        if stopped.code not in (0, None):
            raise
    finally:
        if stack is not None:
            # A second Ctrl-C must not interrupt the clean-up half way.
            signal.signal(signal.SIGINT, signal.SIG_IGN)
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
            stack.stop()
    _exit_now()


def _exit_now() -> NoReturn:
    """Leave once a clean stop is done (streams drained, workers and Redis stopped, engines
    closed), without the interpreter's finalization: it garbage-collects the whole module graph
    (torch's and transformers' in a worker), about 1 s alone and 5-15 s on a loaded machine
    (measured), while supervisors and clients wait for the process to go."""
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _run_uvicorn(settings: Settings) -> None:
    import uvicorn

    from server.app import SETTINGS_ENV, create_app

    server = settings.server
    if server.reload:
        os.environ[SETTINGS_ENV] = json.dumps(settings.model_dump(mode="json"))
        uvicorn.run(
            "server.app:app_from_environment", factory=True, reload=True,
            host=server.host, port=server.port, log_level=server.log_level,
        )  # fmt: skip
    else:
        # On SIGTERM/Ctrl-C uvicorn stops accepting connections and waits for the streams in flight
        # (the workers are still running), at most server.drain_seconds; only then do the embedded
        # workers drain and stop, and Redis last.
        uvicorn.run(
            create_app(settings), host=server.host, port=server.port, log_level=server.log_level,
            timeout_graceful_shutdown=math.ceil(server.drain_seconds),
        )  # fmt: skip


@app.command()
def worker(
    model: ModelsOption = None,
    redis_url: RedisUrlOption = None,
    max_batch: Annotated[int | None, typer.Option("--max-batch", help="Requests in flight at once.")] = None,
    log_level: LogLevelOption = None,
) -> None:
    """Run an RQ worker: it loads and pins the `--model`s, and loads any other model requests ask
    for within its memory budget (worker.memory_budget), evicting idle ones."""
    settings = settings_or_exit(
        {"redis": {"url": redis_url}, "worker": {"models": model or None, "max_batch": max_batch}}
    )
    level = (log_level or "info").upper()
    logging.basicConfig(level="DEBUG" if level == "TRACE" else level, format="%(asctime)s %(name)s %(message)s")
    if not settings.redis.url:
        fail("ollm worker needs a Redis: pass --redis-url or set OLLM_REDIS__URL", code=2)
    import redis

    from ollm.contract import Keys
    from ollm.devices import resolve_device, resolve_dtype
    from ollm.plan import jobs_at_once
    from workers.engines import load_models
    from workers.job import JobContext, install
    from workers.keep_alive import KeepAliveSweeper
    from workers.loads import OnDemandLoader
    from workers.memory import default_budget
    from workers.residency import Residency
    from workers.worker import run_worker

    configured = settings.worker.memory_budget
    device = resolve_device(settings.runtime.device)
    # Measured before anything loads: what this worker may fill.
    budget = int(configured) if configured is not None else default_budget(device)
    # Told to the scheduler, which sizes models by it without planning (or importing torch) itself.
    dtype = resolve_dtype(settings.runtime.dtype, device)
    pinned = settings.worker.models
    started = time.perf_counter()
    try:
        engines, embedders = load_models(pinned, settings)
    except OllmError as exc:
        fail(str(exc))
    served = sorted(set(engines) | set(embedders))
    if served:
        logging.getLogger("ollm.worker").info("loaded %s in %.1fs", ", ".join(served), time.perf_counter() - started)
    connection = redis.Redis.from_url(settings.redis.url)
    keys = Keys(settings.redis.namespace)
    # Pinned models stay; others load on demand within the budget and leave after their
    # keep-alive (Ollama's keep_alive) or when a load needs their room.
    residency = Residency.around(engines, embedders, settings, connection, keys, budget)
    del engines, embedders  # the residents hold the models now: an unload must be able to free them
    loader = None
    if settings.worker.on_demand:
        loader = OnDemandLoader(residency, connection, keys, settings.server.request_timeout_seconds)
    context = JobContext(connection, keys, residency.engines, residency.embedders, loader)
    install(context)
    sweeper = KeepAliveSweeper(residency, connection, keys)
    sweeper.start()
    on_demand = "1" if settings.worker.on_demand else "0"

    def status() -> dict[str, str | int]:
        return {**residency.status(), "on_demand": on_demand, "dtype": dtype}

    def attach(worker: Any) -> None:
        residency.on_served = worker.served

    try:
        run_worker(
            served, connection, context, jobs_at_once(settings), settings.worker.heartbeat_seconds, level,
            status=status, served=attach, drain_seconds=settings.worker.drain_seconds,
            batch_slots=settings.worker.batch_slots,
        )  # fmt: skip
    except OllmError as exc:
        fail(str(exc))
    finally:
        install(None)
        context.close()
        sweeper.stop()
        for engine in {id(e): e for e in list(residency.engines.values())}.values():
            engine.close()
    _exit_now()
