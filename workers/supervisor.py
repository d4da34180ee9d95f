"""The embedded stack of `ollm serve` with no Redis URL: a private Redis plus N worker processes.

Each worker preloads and pins the default chat model and loads every other model on demand.

Children start in their own sessions (a terminal's Ctrl-C reaches only `ollm serve`, which then
stops them in order) and, on Linux, are told to die with their parent, so even a killed
`ollm serve` leaves nothing running.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import redis

from ollm.contract import Keys
from ollm.errors import ServiceUnavailableError
from workers.lifetime import die_with_parent
from workers.memory import default_budget
from workers.redis_server import RedisServer

log = logging.getLogger(__name__)

# A worker first loads its model; a large one on CPU can take minutes.
_READY_TIMEOUT = 600.0
# Beyond the workers' own drain: time to deregister and exit before they are killed.
_STOP_MARGIN = 15.0
BUDGET_ENV = "OLLM_WORKER__MEMORY_BUDGET"
DRAIN_ENV = "OLLM_WORKER__DRAIN_SECONDS"


def worker_command(model: str, redis_url: str, log_level: str) -> list[str]:
    return [
        sys.executable, "-c", "from cli.main import main; main()",
        "worker", "--model", model, "--redis-url", redis_url, "--log-level", log_level,
    ]  # fmt: skip


class EmbeddedStack:
    def __init__(
        self,
        model: str,
        workers: int,
        namespace: str,
        log_level: str = "info",
        data_dir: Path | None = None,
        memory_budget: int | None = None,
        drain_seconds: float = 60.0,
    ) -> None:
        """``data_dir`` None: a Redis that keeps nothing (``--ephemeral``)."""
        self.model = model
        # The workers share this machine: unless configured, each gets its share of the default.
        self.memory_budget = memory_budget
        self.count = workers
        self.keys = Keys(namespace)
        self.log_level = log_level
        self.drain_seconds = drain_seconds
        self.redis = RedisServer(data_dir=data_dir)
        self.workers: list[subprocess.Popen[bytes]] = []

    @property
    def url(self) -> str:
        return self.redis.url

    def start(self) -> EmbeddedStack:
        self.redis.start()
        log.info("private Redis at %s", self.url)
        env = dict(os.environ)
        if self.memory_budget is None and self.count > 1:
            env[BUDGET_ENV] = str(default_budget("cpu", sharing=self.count))
        elif self.memory_budget is not None:
            env[BUDGET_ENV] = str(self.memory_budget)
        env[DRAIN_ENV] = str(self.drain_seconds)
        for _ in range(self.count):
            self.workers.append(
                subprocess.Popen(
                    worker_command(self.model, self.url, self.log_level),
                    start_new_session=True,
                    preexec_fn=die_with_parent,
                    env=env,
                )
            )
        self.wait_ready()
        return self

    def wait_ready(self, timeout: float = _READY_TIMEOUT) -> None:
        """Block until every worker has registered, so the server answers from its first request."""
        client = redis.Redis.from_url(self.url, decode_responses=True)
        deadline = time.monotonic() + timeout
        try:
            while self._registered(client) < self.count:
                dead = [w for w in self.workers if w.poll() is not None]
                if dead:
                    raise ServiceUnavailableError(
                        f"a worker for {self.model!r} exited with status {dead[0].returncode} while starting; "
                        "see its log above"
                    )
                if time.monotonic() > deadline:
                    raise ServiceUnavailableError(f"workers for {self.model!r} not ready after {timeout:g}s")
                time.sleep(0.1)
        finally:
            client.close()

    def _registered(self, client: redis.Redis) -> int:
        """How many of this stack's workers have registered. A persisted Redis still lists the
        workers of the previous run (until their keys expire), so registrations are matched to
        this stack's own processes."""
        ours = {str(w.pid) for w in self.workers}
        host = socket.gethostname()
        count = 0
        for name in client.smembers(self.keys.workers):
            pid, at = client.hmget(self.keys.worker(str(name)), ["pid", "host"])
            count += pid in ours and at == host
        return count

    def stop(self) -> None:
        """Drain the workers (SIGTERM: they take no new jobs and finish their running ones, within
        ``drain_seconds``), then stop Redis."""
        for process in self.workers:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        started = time.monotonic()
        deadline = started + self.drain_seconds + _STOP_MARGIN
        for process in self.workers:
            try:
                process.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        if self.workers:
            log.info("workers stopped in %.2fs", time.monotonic() - started)
        self.workers.clear()
        self.redis.stop()
