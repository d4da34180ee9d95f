"""Real processes for the serving tests: a redis-server, `ollm worker`s and `ollm serve`.

Each helper owns its process and stops it (SIGTERM, then SIGKILL) in ``stop()``; the fixtures in
conftest.py call ``stop()`` whatever the test did, so nothing outlives a test.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import httpx
import openai
import redis

from workers.lifetime import die_with_parent

OLLM = [sys.executable, "-c", "from cli.main import main; main()"]
REPO = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def base_env(namespace: str, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("OLLM_")}
    # The real models dir (pulled once per machine) unless the caller overrides it.
    if "OLLM_RUNTIME__MODELS_DIR" in os.environ:
        env["OLLM_RUNTIME__MODELS_DIR"] = os.environ["OLLM_RUNTIME__MODELS_DIR"]
    env.update({"OLLM_REDIS__NAMESPACE": namespace, "OLLM_CONFIG_FILE": os.devnull, "PYTHONUNBUFFERED": "1"})
    env.update(extra)
    return env


def link_model(source: Path, target: Path) -> Path:
    """A model directory dropped in by hand: the pulled model's files, hard-linked where they can
    be (the same filesystem), else linked."""
    target.mkdir(parents=True)
    for file in source.iterdir():
        if not file.is_file():
            continue
        try:
            os.link(file, target / file.name)
        except OSError:
            (target / file.name).symlink_to(file)
    return target


def wait_until(condition: Any, timeout: float, what: str, interval: float = 0.05) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        result = condition()
        if result:
            return result
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


class Process:
    def __init__(self, command: list[str], env: dict[str, str], log: Path) -> None:
        self.log_path = log
        self._log = log.open("wb")
        self.popen = subprocess.Popen(
            command, env=env, cwd=REPO, stdout=self._log, stderr=subprocess.STDOUT, preexec_fn=die_with_parent
        )
        self._terminated = False

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def output(self) -> str:
        return self.log_path.read_text(errors="replace")

    def kill9(self) -> None:
        self.popen.send_signal(signal.SIGKILL)
        self.popen.wait()

    def terminate(self) -> None:
        """SIGTERM, once: a second one would make a worker's warm shutdown a cold one."""
        if not self._terminated and self.popen.poll() is None:
            self._terminated = True
            self.popen.send_signal(signal.SIGTERM)

    def stop(self, timeout: float = 15.0) -> int:
        self.terminate()
        try:
            self.popen.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.popen.kill()
            self.popen.wait()
        self._log.close()
        return self.popen.returncode


def stop_all(processes: Sequence[Process]) -> None:
    """Stop several processes together: all are signalled first, so their shutdowns overlap."""
    for process in processes:
        process.terminate()
    for process in processes:
        process.stop()


class Worker(Process):
    def __init__(self, redis_url: str, namespace: str, models: list[str], log: Path, **env: str) -> None:
        command = [*OLLM, "worker", "--redis-url", redis_url]
        for model in models:
            command += ["--model", model]
        if set(models) <= {"echo"}:
            # An explicit device needs no torch to resolve: a worker that pins only echo registers
            # without importing it (seconds per worker on this suite's busy machine). "auto" would
            # pick the CPU here all the same.
            env = {"OLLM_RUNTIME__DEVICE": "cpu", **env}
        if models == ["echo"] and "OLLM_RUNTIME__MODELS_DIR" not in env:
            # Nothing to plan: a worker plans the peak of every model in its models dir for the
            # scheduler, importing torch to do so (2.5 s of CPU per echo worker, measured, about 40
            # of them in the suite). An echo worker's tests never load another model on it.
            no_models = log.parent / f"{log.stem}-no-models"
            no_models.mkdir(exist_ok=True)
            env = {"OLLM_RUNTIME__MODELS_DIR": str(no_models), **env}
        super().__init__(command, base_env(namespace, **env), log)
        self.models = models
        self.redis_url = redis_url
        self.namespace = namespace

    def registered_name(self) -> str | None:
        client = redis.Redis.from_url(self.redis_url, decode_responses=True)
        try:
            for name in client.smembers(f"{self.namespace}:workers"):
                pid = client.hget(f"{self.namespace}:worker:{name}", "pid")
                if pid is not None and int(pid) == self.pid:
                    return str(name)
            return None
        finally:
            client.close()

    def wait_ready(self, timeout: float = 120.0) -> Worker:
        def ready() -> str | None:
            if not self.alive():
                raise RuntimeError(f"worker exited:\n{self.output()}")
            return self.registered_name()

        wait_until(ready, timeout, f"worker for {self.models} to register")
        return self


class Server(Process):
    def __init__(self, redis_url: str, namespace: str, log: Path, **env: str) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        command = [*OLLM, "serve", "--redis-url", redis_url, "--port", str(self.port), "--log-level", "warning"]
        super().__init__(command, base_env(namespace, **env), log)

    def wait_ready(self, timeout: float = 180.0) -> Server:
        # Generous: on a busy shared machine `ollm serve`'s imports alone took over 60 s (measured).
        def ready() -> bool:
            if not self.alive():
                raise RuntimeError(f"server exited:\n{self.output()}")
            try:
                return httpx.get(f"{self.url}/v1/health", timeout=2).status_code in (200, 503)
            except httpx.TransportError:
                return False

        wait_until(ready, timeout, "the server to answer")
        return self

    def client(self, **kwargs: Any) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=30, **kwargs)

    def openai_client(self, timeout: float = 120) -> openai.OpenAI:
        """The official client, as a user points it at this server (no retries: a failure shows)."""
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key="unused", max_retries=0, timeout=timeout)


class Live:
    """A real stack in a namespace of its own: `ollm serve` and one `ollm worker` serving ``models``.

    The session's shared one is the ``real_stack`` fixture (tests/conftest.py)."""

    def __init__(self, redis_url: str, logs: Path, models: list[str], **server_env: str) -> None:
        self.redis_url = redis_url
        self.logs = logs
        self.namespace = new_namespace()
        self.server_env = server_env
        # Seeded n=2 choices run side by side in whatever batch they land in: only the batch-invariant
        # mode promises the same tokens whatever the batch holds (docs/engine.md).
        invariant = {"OLLM_RUNTIME__BATCH_INVARIANT": "true"}
        self.worker = Worker(redis_url, self.namespace, models, logs / "worker.log", **invariant)
        self.server = Server(redis_url, self.namespace, logs / "server.log", **server_env)

    def start(self) -> Live:
        self.server.wait_ready()
        self.worker.wait_ready(timeout=300)
        return self

    def own_server(self, log: Path, **env: str) -> Server:
        """Another `ollm serve` over this stack's worker (the shared server's settings unless ``env``
        says otherwise), for a test that restarts or reconfigures it; the test stops it."""
        return Server(self.redis_url, self.namespace, log, **{**self.server_env, **env}).wait_ready()

    def client(self) -> openai.OpenAI:
        return self.server.openai_client()

    def stop(self) -> None:
        stop_all([self.server, self.worker])


def sse_events(lines: Iterator[str]) -> Iterator[tuple[str | None, str]]:
    """(event name, data) for each server-sent event, as a client parses them."""
    event: str | None = None
    data: list[str] = []
    for line in lines:
        if line == "":
            if data:
                yield event, "\n".join(data)
            event, data = None, []
        elif line.startswith("event:"):
            event = line[len("event:") :].strip()
        elif line.startswith("data:"):
            data.append(line[len("data:") :].strip())


def json_events(lines: Iterator[str]) -> Iterator[tuple[str | None, Any]]:
    for event, data in sse_events(lines):
        yield event, data if data == "[DONE]" else json.loads(data)


def new_namespace() -> str:
    return f"t{uuid.uuid4().hex[:10]}"
