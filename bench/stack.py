"""Start a whole ollm stack (`ollm serve` in embedded mode: private Redis + workers) for a benchmark."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Literal

import httpx

OLLM = str(Path(sys.executable).parent / "ollm")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_for(url: str, ready: Callable[[httpx.Response], bool], timeout: float, what: str) -> None:
    """Poll ``url`` until ``ready`` accepts its answer; TimeoutError naming ``what`` after ``timeout``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if ready(httpx.get(url, timeout=2.0)):
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise TimeoutError(f"{what} after {timeout:.0f}s")


def wait_for_model(base_url: str, model: str, timeout: float = 300.0) -> None:
    wait_for(
        f"{base_url}/v1/health",
        lambda health: health.status_code == 200 and model in health.json().get("models", {}),
        timeout,
        f"no worker for {model} at {base_url}",
    )


@contextmanager
def embedded_stack(
    model: str, max_batch: int | Literal["auto"], log_path: Path, extra_env: dict[str, str] | None = None
) -> Iterator[str]:
    """`ollm serve` with its own Redis and one worker serving ``model``; yields the base URL."""
    port = free_port()
    env = {
        **os.environ,
        "OLLM_WORKER__MAX_BATCH": str(max_batch),
        "OLLM_SERVER__LOG_LEVEL": "warning",
        **(extra_env or {}),
    }
    env.pop("OLLM_REDIS__URL", None)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with log_path.open("w") as log:
        process = subprocess.Popen(
            # --ephemeral: a benchmark keeps nothing, and runs beside a real `ollm serve` on the same home.
            [OLLM, "serve", "--port", str(port), "--model", model, "--workers", "1", "--ephemeral"],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        base_url = f"http://127.0.0.1:{port}"
        try:
            wait_for_model(base_url, model)
            yield base_url
        finally:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
