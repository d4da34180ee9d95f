"""The Procfile under honcho: Redis, the server and scaled workers come up and go down together."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import psutil
import pytest

from tests.integration.harness import free_port

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
HONCHO = str(Path(sys.executable).parent / "honcho")


def test_honcho_runs_the_stack_with_two_workers(tmp_path: Path) -> None:
    port, redis_port = free_port(), free_port()
    env = {
        **os.environ,
        # The venv's bin first, as `make serve` users have it activated; echo keeps this test quick.
        "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
        "OLLM_REDIS_PORT": str(redis_port),
        "OLLM_SERVER__PORT": str(port),
        "OLLM_RUNTIME__MODEL_REFERENCE": "echo",
        "OLLM_REDIS__NAMESPACE": f"procfile{port}",
    }
    log = (tmp_path / "honcho.log").open("w")
    honcho = subprocess.Popen(
        [HONCHO, "-f", str(ROOT / "Procfile"), "start", "-c", "redis=1,web=1,worker=2"],
        cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip
    children: list[psutil.Process] = []
    try:
        deadline = time.monotonic() + 90
        health: dict[str, object] = {}
        while time.monotonic() < deadline:
            try:
                health = httpx.get(f"http://127.0.0.1:{port}/v1/health", timeout=2).json()
                # The Procfile's workers pin no model: they load what requests ask for.
                if len(health.get("workers", [])) == 2:  # type: ignore[arg-type]
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        assert len(health.get("workers", [])) == 2, health  # type: ignore[arg-type]
        children = psutil.Process(honcho.pid).children(recursive=True)
        answer = httpx.post(
            f"http://127.0.0.1:{port}/v1/chat/completions",
            json={"model": "echo", "messages": [{"role": "user", "content": "hello procfile"}]},
            timeout=30,
        )
        assert answer.status_code == 200
        assert answer.json()["choices"][0]["message"]["content"] == "hello procfile"
    finally:
        honcho.send_signal(signal.SIGTERM)
        honcho.wait(timeout=60)
        log.close()
    _, alive = psutil.wait_procs(children, timeout=20)
    assert not alive, f"left running: {[p.cmdline() for p in alive]}"
