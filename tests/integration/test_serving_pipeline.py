"""The whole pipeline as a client meets it: HTTP server -> Redis/RQ -> `ollm worker` (echo engine)."""

from __future__ import annotations

import concurrent.futures
import threading

import httpx
import openai
import pytest
import redis
from rq import Queue
from rq.job import Job
from rq.serializers import JSONSerializer

from ollm.contract import Keys
from tests.integration.conftest import Stack
from tests.integration.harness import json_events, wait_until

pytestmark = pytest.mark.slow


def chat(stack: Stack) -> openai.OpenAI:
    return stack.server.openai_client()


def test_chat_completion_with_the_openai_client(echo_stack: Stack) -> None:
    client = chat(echo_stack)
    completion = client.chat.completions.create(
        model="echo", messages=[{"role": "user", "content": "the quick brown fox"}]
    )
    assert completion.choices[0].message.content == "the quick brown fox"
    assert completion.choices[0].finish_reason == "stop"
    assert completion.usage is not None and completion.usage.completion_tokens == 4

    limited = client.chat.completions.create(
        model="echo", messages=[{"role": "user", "content": "one two three four"}], max_tokens=2
    )
    assert limited.choices[0].message.content == "one two"
    assert limited.choices[0].finish_reason == "length"


def test_streaming_chat_completion_with_the_openai_client(echo_stack: Stack) -> None:
    stream = chat(echo_stack).chat.completions.create(
        model="echo",
        messages=[{"role": "user", "content": "stream these five words"}],
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "stream these five words"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 4


def test_sse_wire_format_ends_with_done(echo_stack: Stack) -> None:
    body = {"model": "echo", "stream": True, "messages": [{"role": "user", "content": "a b c"}]}
    with echo_stack.server.client() as client, client.stream("POST", "/v1/chat/completions", json=body) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        events = [data for _, data in json_events(response.iter_lines())]
    assert events[-1] == "[DONE]"
    assert events[0]["choices"][0]["delta"]["role"] == "assistant"
    assert "".join(e["choices"][0]["delta"].get("content", "") for e in events[:-1] if e["choices"]) == "a b c"


def test_native_prompt_and_prompt_stream(echo_stack: Stack) -> None:
    with echo_stack.server.client() as client:
        answer = client.post("/v1/prompt", json={"model": "echo", "prompt": "hello native world"}).json()
        assert answer["text"] == "hello native world"
        assert answer["finish_reason"] == "stop"
        assert answer["usage"]["completion_tokens"] == 3
        assert answer["execution"]["backend"] == "echo"

        with client.stream("POST", "/v1/prompt/stream", json={"model": "echo", "prompt": "x y"}) as response:
            events = list(json_events(response.iter_lines()))
    assert [name for name, _ in events] == ["token", "token", "final"]
    assert events[-1][1]["text"] == "x y"


def test_sessions_keep_the_conversation(echo_stack: Stack) -> None:
    with echo_stack.server.client() as client:
        session = client.post("/v1/sessions", json={"model": "echo", "system": "be brief"}).json()
        first = client.post(f"/v1/sessions/{session['id']}/prompt", json={"prompt": "first turn"}).json()
        assert first["text"] == "first turn" and first["session_id"] == session["id"]
        path = f"/v1/sessions/{session['id']}/prompt/stream"
        with client.stream("POST", path, json={"prompt": "second"}) as response:
            events = list(json_events(response.iter_lines()))
        assert events[-1][0] == "final"
        stored = client.get(f"/v1/sessions/{session['id']}").json()
        assert [(m["role"], m["content"]) for m in stored["messages"]] == [
            ("user", "first turn"), ("assistant", "first turn"), ("user", "second"), ("assistant", "second"),
        ]  # fmt: skip
        # The whole conversation went to the engine: system + 2 turns + new prompt.
        assert events[-1][1]["usage"]["prompt_tokens"] == 7  # "be brief" + "first turn" x2 + "second"
        missing = client.get("/v1/sessions/sess_nope")
        assert missing.status_code == 404
        assert missing.json()["error"]["code"] == "session_not_found"


def test_unserved_model_gets_503_at_once(echo_stack: Stack) -> None:
    body = {"model": "llama3-1B-chat", "messages": [{"role": "user", "content": "hi"}]}
    with echo_stack.server.client() as client:
        response = client.post("/v1/chat/completions", json=body)
        streamed = client.post("/v1/chat/completions", json={**body, "stream": True})
    # At once: refused before anything was queued for a worker to take (or a timeout to end).
    connection = redis.Redis.from_url(echo_stack.redis_url)
    try:
        assert connection.llen(Keys(echo_stack.namespace).rq_queue_key("llama3-1B-chat")) == 0
    finally:
        connection.close()
    for answer in (response, streamed):
        assert answer.status_code == 503
        error = answer.json()["error"]
        assert "llama3-1B-chat" in error["message"]
        assert set(error) == {"message", "type", "param", "code"}


def test_many_requests_run_concurrently_on_one_worker(echo_stack: Stack) -> None:
    words = " ".join(f"w{i}" for i in range(25))  # 25 tokens x 20 ms = 0.5 s each
    arrivals: list[tuple[str, int]] = []  # ("first" | "done", stream), in the order they came
    lock = threading.Lock()

    def one(index: int) -> str:
        stream = chat(echo_stack).chat.completions.create(
            model="echo", messages=[{"role": "user", "content": words}], stream=True
        )
        text = ""
        for chunk in stream:
            piece = chunk.choices[0].delta.content if chunk.choices else None
            if piece:
                if not text:
                    with lock:
                        arrivals.append(("first", index))
                text += piece
        with lock:
            arrivals.append(("done", index))
        return text

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        texts = list(pool.map(one, range(8)))
    assert texts == [words] * 8
    # Served one after another, a stream's first token would only come after another had ended.
    first_done = arrivals.index(next(a for a in arrivals if a[0] == "done"))
    assert {index for kind, index in arrivals[:first_done] if kind == "first"} == set(range(8))


def test_client_disconnect_cancels_the_job(echo_stack: Stack) -> None:
    words = " ".join(f"w{i}" for i in range(500))  # 10 s if nobody stops it
    body = {"model": "echo", "stream": True, "messages": [{"role": "user", "content": words}]}
    with echo_stack.server.client() as client, client.stream("POST", "/v1/chat/completions", json=body) as response:
        lines = response.iter_lines()
        first = next(e for _, e in json_events(lines) if e["choices"] and e["choices"][0]["delta"].get("content"))
    job_id = first["id"].removeprefix("chatcmpl-")
    connection = redis.Redis.from_url(echo_stack.redis_url)
    try:
        job = Job.fetch(job_id, connection=connection, serializer=JSONSerializer)
        wait_until(lambda: job.get_status() == "finished", 3, "the cancelled job to finish")
        result = job.return_value()
        assert result is not None
        assert result["finish_reason"] == "cancelled"
        assert result["usage"]["completion_tokens"] < 100
    finally:
        connection.close()


def test_health_and_model_routes(echo_stack: Stack) -> None:
    with echo_stack.server.client() as client:
        health = client.get("/v1/health").json()
        assert health["status"] == "ok" and health["redis"]["status"] == "ok"
        assert health["models"]["echo"]["workers"] == 1
        assert echo_stack.worker.pid in [w["pid"] for w in health["workers"] if "echo" in w["models"]]
        listed = client.get("/v1/ollm/models").json()["data"]
        echo = next(m for m in listed if m["reference"] == "echo")
        assert echo["serving"]["workers"] == 1
        info = client.get("/v1/ollm/models/echo").json()
        assert info["plan"]["backend"] == "echo" and info["serving"]["workers"] == 1
        assert client.get("/v1/ollm/models/no-such/model").status_code == 404
        plan = client.post("/v1/plan", json={"model": "echo"}).json()
        assert plan["kind"] == "echo"


def test_client_mistakes_get_openai_style_errors(echo_stack: Stack) -> None:
    with echo_stack.server.client() as client:
        invalid = client.post("/v1/chat/completions", json={"model": "echo", "messages": [], "temperature": 9})
        assert invalid.status_code == 422
        assert invalid.json()["error"]["type"] == "invalid_request_error"
        not_json = client.post("/v1/prompt", content=b"{oops", headers={"content-type": "application/json"})
        assert not_json.status_code == 400
        unknown_field = client.post("/v1/prompt", json={"prompt": "x", "temprature": 0.5})
        assert unknown_field.status_code == 422 and unknown_field.json()["error"]["param"] == "temprature"
        assert client.get("/v1/nothing-here").json()["error"]["code"] == "not_found"


def test_docs_work_offline(echo_stack: Stack) -> None:
    with echo_stack.server.client() as client:
        schema = client.get("/openapi.json").json()
        assert "/v1/chat/completions" in schema["paths"] and "/v1/sessions/{session_id}/prompt" in schema["paths"]
        for page in ("/docs", "/redoc"):
            html = client.get(page).text
            assert "/v1/chat/completions" in html
            assert "<script" not in html and "cdn" not in html.lower()


def test_a_client_that_gives_up_on_a_non_streaming_request_cancels_it(echo_stack: Stack) -> None:
    words = " ".join(f"gaveup{i}" for i in range(500))  # 10 s if nobody stops it
    body = {"model": "echo", "prompt": words}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{echo_stack.server.url}/v1/prompt", json=body, timeout=0.5)
    connection = redis.Redis.from_url(echo_stack.redis_url)
    try:
        jobs = Queue(f"{echo_stack.namespace}:model:echo", connection=connection, serializer=JSONSerializer)
        registry = jobs.finished_job_registry

        def cancelled_job() -> dict[str, object] | None:
            for job in Job.fetch_many(registry.get_job_ids(), connection=connection, serializer=JSONSerializer):
                result = job.return_value() if job else None
                if result and result["text"].startswith("gaveup0 gaveup1") and result["finish_reason"] == "cancelled":
                    return dict(result)
            return None

        result = wait_until(cancelled_job, 5, "the abandoned job to be cancelled")
        assert result["usage"]["completion_tokens"] < 200  # type: ignore[index]
    finally:
        connection.close()
