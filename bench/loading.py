"""What loading on demand costs a client: a cold request (the load included) and a model switch
(evict one model, load another), next to a warm request, all end to end through `ollm serve`.

The stack pins only the echo model and may hold two models at once, so every switch between the
chat model and the embedding model evicts the other one.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path
from typing import Any

import httpx

from bench.stack import embedded_stack

_WARM_REQUESTS = 5


def _chat(client: httpx.Client, model: str, max_tokens: int) -> float:
    body = {"model": model, "messages": [{"role": "user", "content": "Say hello."}], "max_tokens": max_tokens}
    started = time.perf_counter()
    answer = client.post("/v1/chat/completions", json=body)
    answer.raise_for_status()
    return time.perf_counter() - started


def _embed(client: httpx.Client, model: str) -> float:
    started = time.perf_counter()
    client.post("/v1/embeddings", json={"model": model, "input": "hello"}).raise_for_status()
    return time.perf_counter() - started


def measure_loading(chat_model: str, embedding_model: str, log_dir: Path, max_tokens: int = 8) -> dict[str, Any]:
    """Seconds, end to end: cold chat (first request, load included), warm chat (median), a switch
    to the embedding model (evicts the chat model) and back (evicts the embedding model), warm
    chat again, and one more switch."""
    env = {"OLLM_WORKER__MAX_LOADED_MODELS": "2"}
    with embedded_stack("echo", 16, log_dir / "loading.log", extra_env=env) as url, httpx.Client(
        base_url=url, timeout=600
    ) as client:
        _chat(client, "echo", 4)  # connections and imports, not loading
        cold = _chat(client, chat_model, max_tokens)
        warm = statistics.median(_chat(client, chat_model, max_tokens) for _ in range(_WARM_REQUESTS))
        switch_to_embedding = _embed(client, embedding_model)
        switch_back = _chat(client, chat_model, max_tokens)
        warm_after = statistics.median(_chat(client, chat_model, max_tokens) for _ in range(_WARM_REQUESTS))
        warm_embedding = _embed(client, embedding_model)
    return {
        "chat_model": chat_model,
        "embedding_model": embedding_model,
        "max_tokens": max_tokens,
        "warm_chat_seconds": warm,
        "cold_chat_seconds": cold,
        "switch_to_embedding_seconds": switch_to_embedding,
        "switch_back_to_chat_seconds": switch_back,
        "warm_chat_after_switch_seconds": warm_after,
        "switch_after_warm_seconds": warm_embedding,
    }


def loading_rows(result: dict[str, Any]) -> list[str]:
    def row(label: str, key: str) -> str:
        return f"{label:<64} {result[key] * 1000:10.1f} ms"

    return [
        row(f"warm request ({result['chat_model']}, median)", "warm_chat_seconds"),
        row("cold request (load included)", "cold_chat_seconds"),
        row(f"model switch -> {result['embedding_model']} (evict + load)", "switch_to_embedding_seconds"),
        row(f"model switch -> {result['chat_model']} (evict + load)", "switch_back_to_chat_seconds"),
        row(f"warm request ({result['chat_model']}, median, after the switches)", "warm_chat_after_switch_seconds"),
        row(f"model switch -> {result['embedding_model']} again", "switch_after_warm_seconds"),
    ]
