"""/v1/messages in-process over fakeredis with the echo engine (tests/test_server_routes.py's stand-in
worker): the route, its errors in Anthropic's shape from every layer (validation, worker, body limit,
API key) and both key headers, without starting any process."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from ollm.settings import Settings
from server.app import create_app
from tests.integration.harness import sse_events
from tests.test_server_routes import FakeWorker, services_for

HELLO: dict[str, Any] = {"model": "echo", "max_tokens": 16, "messages": [{"role": "user", "content": "hello there"}]}


def anthropic_error(answer: Any, status: int, kind: str) -> str:
    assert answer.status_code == status, answer.text
    body = answer.json()
    assert set(body) == {"type", "error"} and body["type"] == "error" and body["error"]["type"] == kind
    return str(body["error"]["message"])


@pytest.fixture
def settings(clean_settings_env: Path) -> Settings:
    return Settings(redis={"url": "redis://fake", "namespace": "unit"}, server={"max_request_bytes": 2048})


@pytest.fixture
def client(settings: Settings) -> Iterator[TestClient]:
    services = services_for(settings)
    worker = FakeWorker(services.sync, services.keys).start()
    try:
        with TestClient(create_app(settings, services)) as test_client:
            yield test_client
    finally:
        worker.stop()


def test_message_stream_and_count_through_the_queue(client: TestClient) -> None:
    answer = client.post("/v1/messages", json=HELLO)
    assert answer.status_code == 200, answer.text
    message = answer.json()
    assert message["content"] == [{"type": "text", "text": "hello there"}] and message["stop_reason"] == "end_turn"
    with client.stream("POST", "/v1/messages", json={**HELLO, "stream": True}) as response:
        events = [(name, json.loads(data)) for name, data in sse_events(response.iter_lines())]
    assert [name for name, _ in events] == [
        "message_start", "content_block_start", "ping", "content_block_delta", "content_block_delta",
        "content_block_stop", "message_delta", "message_stop",
    ]  # fmt: skip
    assert (
        events[-2][1]["usage"]
        == {"input_tokens": 2, "output_tokens": 2}
        == {key: message["usage"][key] for key in ("input_tokens", "output_tokens")}
    )
    counted = client.post("/v1/messages/count_tokens", json={"model": "echo", "messages": HELLO["messages"]})
    assert counted.json() == {"input_tokens": message["usage"]["input_tokens"]}


def test_every_layer_answers_in_anthropic_shape(client: TestClient) -> None:
    assert "max_tokens" in anthropic_error(client.post("/v1/messages", json={**HELLO, "max_tokens": 0}), 400,
                                           "invalid_request_error")  # fmt: skip
    not_json = client.post("/v1/messages", content=b"{", headers={"content-type": "application/json"})
    assert "JSON" in anthropic_error(not_json, 400, "invalid_request_error")
    unserved = client.post("/v1/messages", json={**HELLO, "model": "smollm2-135m-instruct"})
    assert "smollm2-135m-instruct" in anthropic_error(unserved, 503, "overloaded_error")
    big = {**HELLO, "messages": [{"role": "user", "content": "x" * 4096}]}
    assert "server.max_request_bytes" in anthropic_error(client.post("/v1/messages", json=big), 413,
                                                         "request_too_large")  # fmt: skip
    wrong_method = client.get("/v1/messages")
    assert "POST" in anthropic_error(wrong_method, 405, "invalid_request_error")
    assert wrong_method.headers["allow"] == "POST"
    # The OpenAI routes keep OpenAI's shape.
    assert set(client.post("/v1/chat/completions", json={}).json()) == {"error"}


def test_api_key_in_either_header(settings: Settings) -> None:
    settings.server.api_key = "k"
    with TestClient(create_app(settings, services_for(settings))) as client:
        message = anthropic_error(client.post("/v1/messages", json={}), 401, "authentication_error")
        assert "x-api-key" in message
        wrong = client.post("/v1/messages/count_tokens", json={}, headers={"x-api-key": "nope"})
        anthropic_error(wrong, 401, "authentication_error")
        # Past the key, the (empty) body is what is wrong.
        for headers in ({"x-api-key": "k"}, {"Authorization": "Bearer k"}):
            anthropic_error(client.post("/v1/messages", json={}, headers=headers), 400, "invalid_request_error")
        assert client.get("/api/tags", headers={"x-api-key": "k"}).status_code == 200


def test_a_claude_code_shaped_request_is_served(client: TestClient) -> None:
    """What Claude Code sends: beta query and headers, cached system blocks, JSON-schema-draft tools,
    thinking, metadata, a streamed answer."""
    tool = {
        "name": "Read", "description": "Read a file",
        "input_schema": {"$schema": "http://json-schema.org/draft-07/schema#", "type": "object",
                         "properties": {"file_path": {"type": "string"}}, "required": ["file_path"],
                         "additionalProperties": False},
    }  # fmt: skip
    body = {
        **HELLO, "stream": True, "tools": [tool], "metadata": {"user_id": "user_abc_account__session_1"},
        "system": [{"type": "text", "text": "You are Claude Code.", "cache_control": {"type": "ephemeral"}}],
        "messages": [{"role": "user", "content": [
            {"type": "text", "text": "hello there", "cache_control": {"type": "ephemeral"}},
        ]}],
        "thinking": {"type": "enabled", "budget_tokens": 1024}, "context_management": {"edits": []},
    }  # fmt: skip
    headers = {"anthropic-version": "2023-06-01", "anthropic-beta": "claude-code-20250219", "x-app": "cli"}
    with client.stream("POST", "/v1/messages?beta=true", json=body, headers=headers) as response:
        assert response.status_code == 200
        events = [(name, json.loads(data)) for name, data in sse_events(response.iter_lines())]
    text = "".join(data["delta"]["text"] for name, data in events if name == "content_block_delta")
    assert text == "hello there" and events[-1][0] == "message_stop"


@pytest.mark.parametrize(
    ("method", "path", "status", "kind"),
    [
        ("POST", "/v1/messages/batches", 404, "not_found_error"),
        ("GET", "/v1/messages/batches/msgbatch_1/results", 404, "not_found_error"),
        ("DELETE", "/v1/messages/anything", 404, "not_found_error"),
        ("POST", "/v1/messages/", 404, "not_found_error"),
        ("GET", "/v1/messages/count_tokens", 405, "invalid_request_error"),
        ("PUT", "/v1/messages", 405, "invalid_request_error"),
    ],
)
def test_unknown_paths_and_methods_under_messages_answer_in_anthropic_shape(
    client: TestClient, method: str, path: str, status: int, kind: str
) -> None:
    answer = client.request(method, path, json=HELLO)
    message = anthropic_error(answer, status, kind)
    assert path.rstrip("/") in message
    if status == 405:
        assert answer.headers["allow"] == "POST"


def test_the_sdk_raises_its_typed_error_for_an_unknown_messages_path(client: TestClient) -> None:
    import anthropic

    sdk = anthropic.Anthropic(api_key="k", base_url=str(client.base_url), http_client=client, max_retries=0)
    with pytest.raises(anthropic.NotFoundError) as raised:
        sdk.messages.batches.retrieve("msgbatch_1")
    body = raised.value.body
    assert isinstance(body, dict) and body["type"] == "error" and body["error"]["type"] == "not_found_error"
    assert "ollm serves POST /v1/messages" in body["error"]["message"]
