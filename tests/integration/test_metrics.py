"""GET /metrics against the live stack: scrape, send real requests with the official clients of
every API family, scrape again; the counters moved by exactly what was sent and answered."""

from __future__ import annotations

from pathlib import Path

import anthropic
import httpx
import ollama
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import DEFAULT_CHAT_MODEL
from tests.integration.conftest import Stack, WorkerFactory
from tests.integration.harness import Server, wait_until

pytestmark = pytest.mark.slow

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def scrape(server: Server) -> Samples:
    answer = httpx.get(f"{server.url}/metrics", timeout=10)
    assert answer.status_code == 200, answer.text
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(answer.text)
        for sample in family.samples
    }


def total(samples: Samples, name: str, **labels: str) -> float:
    """The sum over the series of ``name`` whose labels include ``labels`` (0 when none exist yet)."""
    wanted = set(labels.items())
    return sum(value for (sample, found), value in samples.items() if sample == name and wanted <= found)


class Moved:
    """What moved between two scrapes."""

    def __init__(self, before: Samples, after: Samples) -> None:
        self.before = before
        self.after = after

    def __call__(self, name: str, **labels: str) -> float:
        return total(self.after, name, **labels) - total(self.before, name, **labels)


def requests_of_every_family(server: Server, model: str, max_tokens: int) -> list[tuple[int, int]]:
    """One chat per API family, streamed and not; (prompt, completion) tokens as each client reported."""
    usages: list[tuple[int, int]] = []
    openai_client = server.openai_client()
    messages = [{"role": "user", "content": "count the words of this sentence please"}]
    for _ in range(2):
        answer = openai_client.chat.completions.create(model=model, messages=messages, max_tokens=max_tokens)  # type: ignore[arg-type]
        assert answer.usage is not None
        usages.append((answer.usage.prompt_tokens, answer.usage.completion_tokens))
    stream = openai_client.chat.completions.create(
        model=model, messages=messages, max_tokens=max_tokens, stream=True,  # type: ignore[arg-type]
        stream_options={"include_usage": True},
    )  # fmt: skip
    usage = [chunk.usage for chunk in stream if chunk.usage is not None][-1]
    usages.append((usage.prompt_tokens, usage.completion_tokens))

    claude = anthropic.Anthropic(base_url=server.url, api_key="unused", max_retries=0)
    message = claude.messages.create(model=model, max_tokens=max_tokens, messages=messages)  # type: ignore[arg-type]
    usages.append((message.usage.input_tokens, message.usage.output_tokens))
    with claude.messages.stream(model=model, max_tokens=max_tokens, messages=messages) as streamed:  # type: ignore[arg-type]
        final = streamed.get_final_message()
    usages.append((final.usage.input_tokens, final.usage.output_tokens))

    llama = ollama.Client(host=server.url)
    chat = llama.chat(model=model, messages=messages, options={"num_predict": max_tokens})
    usages.append((chat.prompt_eval_count or 0, chat.eval_count or 0))

    prompt = {"model": model, "prompt": messages[0]["content"], "max_new_tokens": max_tokens}
    native = httpx.post(f"{server.url}/v1/prompt", json=prompt, timeout=120)
    assert native.status_code == 200, native.text
    usages.append((native.json()["usage"]["prompt_tokens"], native.json()["usage"]["completion_tokens"]))
    return usages


def test_counters_move_by_exactly_what_every_family_sent(echo_stack: Stack) -> None:
    server = echo_stack.server
    before = scrape(server)
    usages = requests_of_every_family(server, "echo", max_tokens=64)
    moved = Moved(before, scrape(server))
    sent = len(usages)

    assert moved("ollm_http_requests_total", route="/v1/chat/completions", method="POST", status="200") == 3
    assert moved("ollm_http_requests_total", route="/v1/messages", method="POST", status="200") == 2
    assert moved("ollm_http_requests_total", route="/api/chat", method="POST", status="200") == 1
    assert moved("ollm_http_requests_total", route="/v1/prompt", method="POST", status="200") == 1
    assert moved("ollm_http_request_duration_seconds_count", route="/v1/chat/completions") == 3
    # Per model, whichever family asked.
    assert moved("ollm_model_requests_total", model="echo", kind="generate") == sent
    assert moved("ollm_model_requests_total", model="echo", kind="generate", outcome="stop") == sent
    assert moved("ollm_prompt_tokens_total", model="echo") == sum(prompt for prompt, _ in usages)
    assert moved("ollm_generation_tokens_total", model="echo") == sum(completion for _, completion in usages)
    assert moved("ollm_time_to_first_token_seconds_count", model="echo") == sent
    # The echo engine sends one token per event: one gap fewer than tokens per request.
    assert moved("ollm_inter_token_latency_seconds_count", model="echo") == sum(c - 1 for _, c in usages)
    assert moved("ollm_queue_wait_seconds_count", model="echo") == sent
    assert moved("ollm_model_request_duration_seconds_count", model="echo", kind="generate") == sent
    assert moved("ollm_time_to_first_token_seconds_sum", model="echo") > 0


def test_error_statuses_are_counted_under_their_code(echo_stack: Stack) -> None:
    server = echo_stack.server
    before = scrape(server)
    with server.client() as client:
        for _ in range(2):
            unknown = client.post(
                "/v1/chat/completions", json={"model": "nope", "messages": [{"role": "user", "content": "x"}]}
            )
            assert unknown.status_code == 404
        assert client.post("/v1/chat/completions", json={"model": "echo", "messages": "x"}).status_code == 422
        assert client.get("/v1/sessions/no-such-session").status_code == 404
        assert client.get("/v1/no/such/route").status_code == 404
    moved = Moved(before, scrape(server))
    assert moved("ollm_http_requests_total", route="/v1/chat/completions", status="404") == 2
    assert moved("ollm_http_requests_total", route="/v1/chat/completions", status="422") == 1
    assert moved("ollm_http_requests_total", route="/v1/sessions/{session_id}", status="404") == 1
    assert moved("ollm_http_requests_total", route="unmatched", status="404") == 1
    # Refused before any job: no model request was counted.
    assert moved("ollm_model_requests_total") == 0


def test_worker_gauges_name_the_worker_and_follow_its_sequences(echo_stack: Stack) -> None:
    server = echo_stack.server
    name = echo_stack.worker.registered_name()
    assert name is not None
    idle = scrape(server)
    assert total(idle, "ollm_redis_up") == 1
    assert total(idle, "ollm_worker_up", worker=name) == 1
    assert total(idle, "ollm_worker_info", worker=name, pid=str(echo_stack.worker.pid)) == 1
    assert total(idle, "ollm_worker_max_batch_size", worker=name) >= 1
    assert total(idle, "ollm_worker_loaded_models", worker=name) == 1
    assert (("ollm_worker_model_memory_bytes", frozenset({("worker", name), ("model", "echo"), ("pinned", "true")}))
            in idle)  # fmt: skip
    assert total(idle, "ollm_model_workers", model="echo") == 1
    assert ("ollm_queue_depth", frozenset({("model", "echo")})) in idle

    # A long answer (20 s: 20 ms a word) keeps one sequence in the worker's batch while we look.
    words = " ".join(f"w{i}" for i in range(1000))
    body = {"model": "echo", "messages": [{"role": "user", "content": words}], "max_tokens": 1000, "stream": True}
    with server.client() as client, client.stream("POST", "/v1/chat/completions", json=body) as streaming:
        assert streaming.status_code == 200
        lines = streaming.iter_lines()  # kept: a discarded iterator would close the response
        next(lines)

        # The heartbeat (1 s) and the loaded-models report (0.5 s) each catch up in their own time.
        def busy() -> bool:
            samples = scrape(server)
            return (
                total(samples, "ollm_worker_running_sequences", worker=name) == 1
                and total(samples, "ollm_worker_batch_size", worker=name) == 1
                and total(samples, "ollm_worker_in_flight_requests", worker=name) == 1
                and total(samples, "ollm_worker_model_in_flight_requests", worker=name, model="echo") == 1
            )

        wait_until(busy, timeout=15, what="the worker to report its running sequence", interval=0.2)
    # The client left mid-stream: counted as abandoned once the server has closed the stream.
    wait_until(
        lambda: total(scrape(server), "ollm_model_requests_total", model="echo", outcome="abandoned")
        > total(idle, "ollm_model_requests_total", model="echo", outcome="abandoned"),
        timeout=15, what="the abandoned stream to be counted",
    )  # fmt: skip


def test_tokens_of_the_real_model_are_counted_as_the_clients_saw_them(
    default_model_dir: Path, echo_stack: Stack, start_worker: WorkerFactory
) -> None:
    start_worker(DEFAULT_CHAT_MODEL, ns=echo_stack.namespace).wait_ready(timeout=300)
    server = echo_stack.server
    before = scrape(server)
    usages = requests_of_every_family(server, DEFAULT_CHAT_MODEL, max_tokens=6)
    moved = Moved(before, scrape(server))
    assert all(prompt > 0 and 0 < completion <= 6 for prompt, completion in usages), usages
    assert moved("ollm_prompt_tokens_total", model=DEFAULT_CHAT_MODEL) == sum(p for p, _ in usages)
    assert moved("ollm_generation_tokens_total", model=DEFAULT_CHAT_MODEL) == sum(c for _, c in usages)
    assert moved("ollm_model_requests_total", model=DEFAULT_CHAT_MODEL, kind="generate") == len(usages)
    assert moved("ollm_model_request_duration_seconds_count", model=DEFAULT_CHAT_MODEL) == len(usages)
    assert moved("ollm_queue_wait_seconds_count", model=DEFAULT_CHAT_MODEL) == len(usages)
    assert total(scrape(server), "ollm_worker_model_memory_bytes", model=DEFAULT_CHAT_MODEL) > 0
