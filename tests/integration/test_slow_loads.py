"""A load that takes longer than server.worker_lost_seconds, on a real stack: the worker keeps
beating, serves its resident model meanwhile, and shows how far the load has got.

The loading model is a second copy of the real SmolLM2 (its files hard-linked under another
directory name), loaded on demand through the real loading code; OLLM_LOAD_TENSOR_DELAY slows
each tensor a little so the load outlasts worker_lost_seconds on any machine.
"""

from __future__ import annotations

import collections
import re
import threading
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import DEFAULT_CHAT_MODEL
from tests.integration.conftest import ServerFactory, WorkerFactory
from tests.integration.harness import link_model, wait_until

pytestmark = pytest.mark.slow

LOST_AFTER = "2"
# SmolLM2 has 273 tensors: about 5.5 s of delay on top of the real read.
TENSOR_DELAY = "0.02"
# RQ logs each job it takes off a queue, "Worker <name>: <queue>: <description> (<job id>)", and
# each it finishes, "... Job OK (<job id>)".
DEQUEUED = re.compile(r"Worker \S+: \S+: (?!Job OK \().* \((\S+)\)$", re.MULTILINE)


def test_a_load_longer_than_worker_lost_seconds_is_loading_not_lost(
    tmp_path: Path, default_model_dir: Path, start_worker: WorkerFactory, start_server: ServerFactory
) -> None:
    models = tmp_path / "models"
    link_model(default_model_dir, models / default_model_dir.name)
    slow = str(link_model(default_model_dir, models / "smollm2-copy"))
    env = {"OLLM_RUNTIME__MODELS_DIR": str(models), "OLLM_RUNTIME__DTYPE": "float32"}
    worker = start_worker(DEFAULT_CHAT_MODEL, OLLM_LOAD_TENSOR_DELAY=TENSOR_DELAY, **env)
    server = start_server(OLLM_SERVER__WORKER_LOST_SECONDS=LOST_AFTER, **env)
    client = server.openai_client()
    streamed: list[Any] = []
    answers: dict[str, Any] = {}

    def stream() -> None:
        chunks = client.chat.completions.create(
            model=DEFAULT_CHAT_MODEL,
            messages=[{"role": "user", "content": "Count from one to twenty in words."}],
            max_tokens=48,
            temperature=0,
            stream=True,
        )
        streamed.extend(chunks)

    def load() -> None:
        answers["slow"] = httpx.post(
            f"{server.url}/v1/chat/completions",
            json={"model": slow, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4},
            timeout=300,
        )

    streamer = threading.Thread(target=stream)
    streamer.start()
    wait_until(lambda: streamed, 120, "the stream's first chunk")
    loader = threading.Thread(target=load)
    loader.start()

    progress: list[dict[str, Any]] = []

    def seen_loading() -> bool:
        entries = httpx.get(f"{server.url}/api/ps", timeout=10).json()["models"]
        progress.extend(e["loading"] for e in entries if e.get("loading"))
        return loader.is_alive() is False or (len(progress) >= 2 and progress[-1]["bytes_read"] > 0)

    wait_until(seen_loading, 300, "/api/ps to show the load", interval=0.2)
    streamer.join(timeout=120)
    loader.join(timeout=300)

    # The stream on the resident model ended whole: content, then a finish reason, no error.
    assert "".join(c.choices[0].delta.content or "" for c in streamed if c.choices)
    assert streamed[-1].choices[0].finish_reason in ("stop", "length")
    # The load outlasted worker_lost_seconds and its request was answered, not failed as lost.
    assert answers["slow"].status_code == 200, answers["slow"].text
    assert progress and all(0 <= p["bytes_read"] <= p["bytes_total"] for p in progress)
    assert [p["bytes_read"] for p in progress] == sorted(p["bytes_read"] for p in progress)
    # Loaded exactly once, and no job ran twice (no requeue of a job that was still running).
    record = httpx.get(f"{server.url}/v1/health", timeout=10).json()["workers"][0]
    assert record["loads"] == 2, record  # the pinned model at start, then the copy
    log = worker.output()
    assert log.count(f"loading {slow} on demand") == 1, log
    runs = collections.Counter(DEQUEUED.findall(log))
    assert runs and max(runs.values()) == 1, runs
