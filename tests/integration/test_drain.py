"""A normal shutdown (SIGTERM) never cuts a stream mid-answer: workers and `ollm serve` drain."""

from __future__ import annotations

import signal
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest

from tests.integration.conftest import ServerFactory, WorkerFactory
from tests.integration.harness import OLLM, Process, base_env, free_port, json_events, new_namespace, wait_until

pytestmark = pytest.mark.slow


def stream_chat(url: str, text: str, into: dict[str, Any], first_token: threading.Event | None = None) -> None:
    """One streaming chat request; its text, finish reason and any error land in ``into``."""
    body = {"model": "echo", "stream": True, "messages": [{"role": "user", "content": text}]}
    pieces: list[str] = []
    with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=60) as response:
        for _, event in json_events(response.iter_lines()):
            if event == "[DONE]":
                into["done"] = True
                break
            if "error" in event:
                into["error"] = event["error"]
            elif event["choices"]:
                choice = event["choices"][0]
                pieces.append(choice["delta"].get("content") or "")
                into["finish"] = choice.get("finish_reason") or into.get("finish")
                if first_token is not None and pieces[-1]:
                    first_token.set()
    into["text"] = "".join(pieces)


def test_a_worker_past_its_drain_time_ends_its_streams_with_an_error(
    start_worker: WorkerFactory, start_server: ServerFactory
) -> None:
    worker = start_worker("echo", OLLM_ECHO_TOKEN_DELAY="0.05", OLLM_WORKER__DRAIN_SECONDS="1")
    server = start_server()
    text = " ".join(f"w{i}" for i in range(400))  # 20 s: far beyond the drain time
    result: dict[str, Any] = {}
    first = threading.Event()
    client = threading.Thread(target=stream_chat, args=(server.url, text, result, first))
    client.start()
    assert first.wait(30)
    worker.popen.send_signal(signal.SIGTERM)
    signalled = time.monotonic()
    assert worker.popen.wait(timeout=30) == 0
    exited_after = time.monotonic() - signalled
    client.join(timeout=30)

    # Not a short answer that looks whole: an error the client can act on.
    assert result["error"]["code"] == "worker_stopped", result
    assert "worker.drain_seconds" in result["error"]["message"]
    assert result["done"] and len(result["text"]) < len(text)
    print(f"drain bound: SIGTERM -> worker exit {exited_after:.2f}s (worker.drain_seconds=1)")


def test_sigterm_to_embedded_serve_lets_every_stream_finish_then_stops(tmp_path: Path) -> None:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = base_env(
        new_namespace(), TMPDIR=str(tmp_path), OLLM_REDIS__DATA_DIR=str(tmp_path / "data"), OLLM_ECHO_TOKEN_DELAY="0.02"
    )
    serve = Process(
        [*OLLM, "serve", "--model", "echo", "--port", str(port), "--log-level", "info"], env, tmp_path / "serve.log"
    )
    try:

        def healthy() -> bool:
            assert serve.alive(), serve.output()
            try:
                return httpx.get(f"{url}/v1/health", timeout=2).json()["models"]["echo"]["workers"] == 1
            except (httpx.TransportError, KeyError):
                return False

        wait_until(healthy, 90, "the embedded stack", interval=0.2)
        children = psutil.Process(serve.pid).children(recursive=True)
        texts = [" ".join(f"{n}{i}" for i in range(150)) for n in "abc"]  # 3 s each
        results: list[dict[str, Any]] = [{} for _ in texts]
        firsts = [threading.Event() for _ in texts]
        clients = [
            threading.Thread(target=stream_chat, args=(url, text, result, first))
            for text, result, first in zip(texts, results, firsts, strict=True)
        ]
        for client in clients:
            client.start()
        assert all(first.wait(30) for first in firsts)

        serve.popen.send_signal(signal.SIGTERM)
        signalled = time.monotonic()
        for client in clients:
            client.join(timeout=60)
        streams_done_after = time.monotonic() - signalled
        assert serve.popen.wait(timeout=60) == 0, serve.output()
        exited_after = time.monotonic() - signalled

        for text, result in zip(texts, results, strict=True):
            assert "error" not in result and result["done"], result
            assert result["text"] == text and result["finish"] == "stop"
        wait_until(lambda: not any(c.is_running() and c.status() != "zombie" for c in children), 10, "children")
        print(
            f"serve drain: SIGTERM -> streams complete {streams_done_after:.2f}s, -> serve exit {exited_after:.2f}s"
        )
    finally:
        serve.stop(timeout=60)
