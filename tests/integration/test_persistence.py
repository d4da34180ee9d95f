"""Embedded `ollm serve` keeps its Redis data on disk: what was stored outlives restarts and kill -9."""

from __future__ import annotations

import signal
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import psutil
import pytest

from tests.integration.harness import OLLM, Process, base_env, free_port, wait_until

pytestmark = pytest.mark.slow


class EmbeddedServe(Process):
    """`ollm serve --model echo` running its own Redis and one worker, on a data directory."""

    def __init__(self, data_dir: Path, log: Path, *flags: str) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        command = [*OLLM, "serve", "--model", "echo", "--port", str(self.port), "--log-level", "warning", *flags]
        # One namespace for every run on this data directory: it is the same deployment restarted.
        env = base_env("persist", TMPDIR=str(log.parent), OLLM_REDIS__DATA_DIR=str(data_dir))
        super().__init__(command, env, log)

    def wait_ready(self) -> EmbeddedServe:
        def ready() -> bool:
            assert self.alive(), self.output()
            try:
                return httpx.get(f"{self.url}/v1/health", timeout=2).status_code == 200
            except httpx.TransportError:
                return False

        wait_until(ready, 120, "the embedded stack", interval=0.2)
        return self

    def client(self) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key="unused", max_retries=0, timeout=60)

    def kill_everything(self) -> None:
        """kill -9 of the whole stack at once: serve, its worker and its Redis."""
        stack = [psutil.Process(self.pid), *psutil.Process(self.pid).children(recursive=True)]
        for process in stack:
            process.kill()
        psutil.wait_procs(stack, timeout=10)
        self.stop()


@pytest.fixture
def serves() -> Iterator[list[EmbeddedServe]]:
    started: list[EmbeddedServe] = []
    yield started
    for serve in started:
        serve.stop(timeout=30)


def start(serves: list[EmbeddedServe], data_dir: Path, tmp_path: Path, *flags: str) -> EmbeddedServe:
    serve = EmbeddedServe(data_dir, tmp_path / f"serve{len(serves)}.log", *flags)
    serves.append(serve)
    return serve.wait_ready()


def test_stored_responses_and_sessions_survive_a_restart_and_a_kill_9(
    serves: list[EmbeddedServe], tmp_path: Path
) -> None:
    data = tmp_path / "data"
    first = start(serves, data, tmp_path)
    kept = first.client().responses.create(model="echo", input="kept across a restart", store=True)
    session = httpx.post(f"{first.url}/v1/sessions", json={"model": "echo"}).json()
    httpx.post(f"{first.url}/v1/sessions/{session['id']}/prompt", json={"prompt": "remember"}).raise_for_status()
    assert first.stop(timeout=30) in (0, 128 + signal.SIGTERM)

    second = start(serves, data, tmp_path)
    assert second.client().responses.retrieve(kept.id).output_text == "kept across a restart"
    restored = httpx.get(f"{second.url}/v1/sessions/{session['id']}").json()
    assert [m["content"] for m in restored["messages"]] == ["remember", "remember"]
    crashed = second.client().responses.create(model="echo", input="kept across a crash", store=True)
    second.kill_everything()

    third = start(serves, data, tmp_path)
    client = third.client()
    assert client.responses.retrieve(kept.id).output_text == "kept across a restart"
    assert client.responses.retrieve(crashed.id).output_text == "kept across a crash"
    # And a stored response still chains.
    follow = client.responses.create(model="echo", input="and on", previous_response_id=crashed.id, store=True)
    assert follow.output_text == "and on"


def test_a_second_serve_on_the_same_data_directory_refuses(serves: list[EmbeddedServe], tmp_path: Path) -> None:
    data = tmp_path / "data"
    first = start(serves, data, tmp_path)
    second = EmbeddedServe(data, tmp_path / "second.log")
    serves.append(second)
    assert second.popen.wait(timeout=60) != 0
    assert f"the Redis data directory {data} is in use by another `ollm serve` (pid {first.pid})" in second.output()
    # The first one is unharmed.
    assert first.client().responses.create(model="echo", input="still here").output_text == "still here"


def test_ephemeral_keeps_nothing(serves: list[EmbeddedServe], tmp_path: Path) -> None:
    data = tmp_path / "data"
    first = start(serves, data, tmp_path, "--ephemeral")
    stored = first.client().responses.create(model="echo", input="forget me", store=True)
    first.stop(timeout=30)
    assert not data.exists()

    second = start(serves, data, tmp_path, "--ephemeral")
    with pytest.raises(openai.NotFoundError):
        second.client().responses.retrieve(stored.id)
