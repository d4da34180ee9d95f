"""A gemma3 model (sliding-window layers) batched through a real `ollm worker` and `ollm serve`:
concurrent chat completions from the official openai client answer what each gets alone, and the
server's /metrics shows the worker running them as one batch."""

from __future__ import annotations

import threading
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from bench.families import build_tiny
from tests.integration.conftest import ServerFactory, WorkerFactory

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

QUESTIONS = ["Hi", "What is the capital of France? Answer briefly.", "Tell me a story about a ship.", "1 2 3 4 5 6 7"]
MAX_TOKENS = [24, 12, 30, 18]


def _batch_size(url: str) -> float:
    text = httpx.get(f"{url}/metrics", timeout=10).text
    return max(
        (
            s.value
            for f in text_string_to_metric_families(text)
            for s in f.samples
            if s.name == "ollm_worker_batch_size"
        ),
        default=0.0,
    )


def test_gemma3_requests_batch_in_a_live_worker_and_answer_as_alone(
    default_model_dir: Path, tmp_path: Path, start_server: ServerFactory, start_worker: WorkerFactory
) -> None:
    models = tmp_path / "models"
    model = str(build_tiny("gemma3", models / "tiny-gemma3", default_model_dir))
    env = {"OLLM_RUNTIME__MODELS_DIR": str(models), "OLLM_RUNTIME__DTYPE": "float32"}
    worker = start_worker(model, wait=False, OLLM_WORKER__MAX_BATCH="8", OLLM_WORKER__HEARTBEAT_SECONDS="0.2", **env)
    worker.wait_ready(timeout=300)
    server = start_server(**env)
    client = server.openai_client(timeout=300)

    def ask(question: str, max_tokens: int) -> tuple[str | None, int]:
        answer = client.chat.completions.create(
            model=model,
            messages=[{"role": "user", "content": question}],
            max_tokens=max_tokens,
            temperature=0,
        )
        assert answer.usage is not None
        return answer.choices[0].message.content, answer.usage.completion_tokens

    alone = [ask(q, n) for q, n in zip(QUESTIONS, MAX_TOKENS, strict=True)]
    together: list[tuple[str | None, int] | None] = [None] * len(QUESTIONS)

    def run(index: int) -> None:
        together[index] = ask(QUESTIONS[index], MAX_TOKENS[index])

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(QUESTIONS))]
    for thread in threads:
        thread.start()
    largest = 0.0
    while any(thread.is_alive() for thread in threads):
        largest = max(largest, _batch_size(server.url))
    for thread in threads:
        thread.join()
    assert together == alone
    assert largest >= 2, "the worker never reported a batch of more than one"

    with server.client() as http:
        planned = http.post("/v1/prompt", json={"model": model, "prompt": "Hi", "max_new_tokens": 2}, timeout=120)
    assert planned.status_code == 200, planned.text
    reason = planned.json()["execution"]["fallback_reason"] or ""
    assert "one at a time" not in reason
