"""Two workers on two queues (the echo engine and the real SmolLM model) behind one server."""

from __future__ import annotations

import concurrent.futures
from pathlib import Path

import openai
import pytest

from tests.integration.conftest import Stack, WorkerFactory

pytestmark = pytest.mark.slow

REAL_MODEL = "smollm2-135m-instruct"


def test_two_models_on_two_queues_serve_concurrent_requests(
    default_model_dir: Path, echo_stack: Stack, start_worker: WorkerFactory
) -> None:
    # A second worker, for the real model, joins the echo worker behind the same server.
    start_worker(REAL_MODEL, ns=echo_stack.namespace).wait_ready(timeout=300)
    server = echo_stack.server
    client = server.openai_client()

    def ask(model: str, content: str) -> openai.types.chat.ChatCompletion:
        return client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": content}], max_tokens=12, temperature=0
        )

    questions = [("echo", f"echo number {i}") for i in range(4)] + [(REAL_MODEL, "What is 2 + 2?")] * 2
    with concurrent.futures.ThreadPoolExecutor(len(questions)) as pool:
        answers = list(pool.map(lambda q: ask(*q), questions))

    for (model, content), answer in zip(questions, answers, strict=True):
        assert answer.model == model
        text = answer.choices[0].message.content or ""
        if model == "echo":
            assert text == content
        else:
            assert text.strip(), "the real model produced no text"
            assert answer.usage is not None and 0 < answer.usage.completion_tokens <= 12
    # Greedy decoding: both real-model answers are the same.
    assert answers[-1].choices[0].message.content == answers[-2].choices[0].message.content

    stream = client.chat.completions.create(
        model=REAL_MODEL, messages=[{"role": "user", "content": "Say hello."}], max_tokens=8, stream=True
    )
    chunks = list(stream)
    assert chunks[-1].choices[0].finish_reason in ("stop", "length")
    assert "".join(c.choices[0].delta.content or "" for c in chunks).strip()

    health = server.client().get("/v1/health").json()
    assert health["models"]["echo"]["workers"] == 1 and health["models"][REAL_MODEL]["workers"] == 1
