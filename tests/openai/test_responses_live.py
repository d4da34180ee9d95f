"""The Responses API through the `openai` client against a live stack: storage, chaining (also across
a server restart), function calls, typed streaming events, failure mid-stream, store disabled."""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from tests.conftest import DEFAULT_CHAT_MODEL
from tests.integration.harness import Live, Server, Worker, new_namespace
from workers.redis_server import RedisServer

pytestmark = pytest.mark.slow

MODEL = DEFAULT_CHAT_MODEL
WEATHER: Any = {
    "type": "function",
    "name": "get_weather",
    "description": "Get the current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
}
STREAM_ORDER = [
    "response.created",
    "response.in_progress",
    "response.output_item.added",
    "response.content_part.added",
    "response.output_text.delta",
    "response.output_text.done",
    "response.content_part.done",
    "response.output_item.done",
    "response.completed",
]


def name_format(names: list[str]) -> Any:
    """Answers limited to a few names: which one the model picks shows what it knows."""
    schema = {"type": "object", "properties": {"answer": {"enum": names}}, "required": ["answer"],
              "additionalProperties": False}  # fmt: skip
    return {"format": {"type": "json_schema", "name": "answer", "schema": schema, "strict": True}}


def test_create_retrieve_input_items_delete(client: openai.OpenAI) -> None:
    created = client.responses.create(
        model=MODEL, input="What is the capital of France?", instructions="You are a helpful assistant.",
        max_output_tokens=12, temperature=0, metadata={"topic": "geography"},
    )  # fmt: skip
    assert created.id.startswith("resp_") and created.object == "response"
    assert created.status in ("completed", "incomplete") and created.output_text
    assert created.metadata == {"topic": "geography"} and created.instructions == "You are a helpful assistant."
    assert created.usage is not None and 0 < created.usage.output_tokens <= 12

    fetched = client.responses.retrieve(created.id)
    assert fetched.model_dump() == created.model_dump()

    items = client.responses.input_items.list(created.id)
    (item,) = items.data
    assert item.type == "message" and item.role == "user"
    assert item.content[0].type == "input_text" and item.content[0].text == "What is the capital of France?"

    client.responses.delete(created.id)
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(created.id)

    unstored = client.responses.create(model=MODEL, input="Hi", max_output_tokens=2, store=False)
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(unstored.id)


def test_three_turn_chain_is_the_conversation_sent_explicitly(client: openai.OpenAI) -> None:
    first = client.responses.create(model=MODEL, input="My name is Ada.", max_output_tokens=10, temperature=0)
    second = client.responses.create(
        model=MODEL, input="Say hello.", previous_response_id=first.id, max_output_tokens=8, temperature=0
    )
    names = ["Emily", "Zoe", "Ada", "Maria"]
    third = client.responses.create(
        model=MODEL, input="What is my name?", previous_response_id=second.id, text=name_format(names),
        max_output_tokens=20, temperature=0,
    )  # fmt: skip
    assert third.previous_response_id == second.id
    assert json.loads(third.output_text)["answer"] in names
    # The chain is exactly the conversation: sent explicitly, the same turns make the same prompt
    # and (greedy, same machine) the same answer. Which name a 135M model picks is not asserted.
    explicit = client.responses.create(
        model=MODEL, text=name_format(names), max_output_tokens=20, temperature=0,
        input=[
            {"role": "user", "content": "My name is Ada."},
            {"role": "assistant", "content": first.output_text},
            {"role": "user", "content": "Say hello."},
            {"role": "assistant", "content": second.output_text},
            {"role": "user", "content": "What is my name?"},
        ],
    )  # fmt: skip
    assert third.usage is not None and explicit.usage is not None
    assert third.usage.input_tokens == explicit.usage.input_tokens
    assert third.output_text == explicit.output_text
    # Each response lists only its own input.
    assert [i.type for i in client.responses.input_items.list(third.id).data] == ["message"]


def test_streaming_events_with_the_sdk_helper_and_storage(client: openai.OpenAI) -> None:
    with client.responses.stream(
        model=MODEL, input="What is the capital of France?", max_output_tokens=40, temperature=0
    ) as stream:
        events = list(stream)
        final = stream.get_final_response()
    kinds = [event.type for event in events]
    # Collapse the deltas: the order of everything else is fixed.
    assert [k for i, k in enumerate(kinds) if k != "response.output_text.delta" or kinds[i - 1] != k] == STREAM_ORDER
    assert [event.sequence_number for event in events] == list(range(len(events)))
    deltas = "".join(event.delta for event in events if event.type == "response.output_text.delta")
    # "Paris" is the one semantic anchor kept: the answer's first tokens, by a wide margin on any kernel.
    assert deltas == final.output_text and "Paris" in final.output_text
    assert final.status == "completed"
    # A streamed response is stored like any other.
    assert client.responses.retrieve(final.id).output_text == final.output_text


def test_streamed_function_call_round_trip(client: openai.OpenAI) -> None:
    with client.responses.stream(
        model=MODEL, input="What is the weather in Paris?", tools=[WEATHER], tool_choice="required",
        max_output_tokens=40, temperature=0,
    ) as stream:  # fmt: skip
        events = list(stream)
        asked = stream.get_final_response()
    # A forced call is the whole output: one function_call item, no message.
    assert [event.type for event in events] == [
        "response.created", "response.in_progress", "response.output_item.added",
        "response.function_call_arguments.delta", "response.function_call_arguments.done",
        "response.output_item.done", "response.completed",
    ]  # fmt: skip
    done = [event for event in events if event.type == "response.function_call_arguments.done"][0]
    (call,) = [item for item in asked.output if item.type == "function_call"]
    assert call.name == "get_weather" and call.status == "completed" and call.arguments == done.arguments
    assert isinstance(json.loads(call.arguments)["city"], str)

    # The result goes back as a function_call_output item, chained to the stored call.
    answered = client.responses.create(
        model=MODEL, previous_response_id=asked.id, tools=[WEATHER], tool_choice="none", max_output_tokens=24,
        temperature=0,
        input=[{"type": "function_call_output", "call_id": call.call_id, "output": "Sunny, 18 degrees Celsius."}],
    )  # fmt: skip
    assert [item.type for item in answered.output] == ["message"] and answered.output_text
    # The chained call and result are the same conversation as sending both items explicitly.
    explicit = client.responses.create(
        model=MODEL, tools=[WEATHER], tool_choice="none", max_output_tokens=24, temperature=0,
        input=[
            {"role": "user", "content": "What is the weather in Paris?"},
            {"type": "function_call", "call_id": call.call_id, "name": call.name, "arguments": call.arguments},
            {"type": "function_call_output", "call_id": call.call_id, "output": "Sunny, 18 degrees Celsius."},
        ],
    )  # fmt: skip
    assert answered.usage is not None and explicit.usage is not None
    assert answered.usage.input_tokens == explicit.usage.input_tokens
    assert answered.output_text == explicit.output_text

    with pytest.raises(openai.BadRequestError, match="call_id"):
        client.responses.create(
            model=MODEL, input=[{"type": "function_call_output", "call_id": "call_unknown", "output": "x"}]
        )


def test_chaining_survives_a_server_restart(live: Live, tmp_path: Path) -> None:
    # A server of its own to restart, over the shared worker and Redis.
    server = live.own_server(tmp_path / "server0.log")
    try:
        before = server.openai_client().responses.create(
            model=MODEL, input="I live in Lisbon.", max_output_tokens=8, temperature=0
        )
        server.stop()
        server = live.own_server(tmp_path / "server1.log")
        _chain_after_restart(server.openai_client(), before)
    finally:
        server.stop()


def _chain_after_restart(client: openai.OpenAI, before: Any) -> None:
    assert client.responses.retrieve(before.id).output_text == before.output_text
    cities = name_format(["Paris", "London", "Lisbon", "Berlin"])
    after = client.responses.create(
        model=MODEL, input="Which city do I live in?", previous_response_id=before.id, text=cities,
        max_output_tokens=20, temperature=0,
    )  # fmt: skip
    # The restarted server still has turn one: the chain equals the conversation sent explicitly.
    explicit = client.responses.create(
        model=MODEL, text=cities, max_output_tokens=20, temperature=0,
        input=[
            {"role": "user", "content": "I live in Lisbon."},
            {"role": "assistant", "content": before.output_text},
            {"role": "user", "content": "Which city do I live in?"},
        ],
    )  # fmt: skip
    assert after.usage is not None and explicit.usage is not None
    assert after.usage.input_tokens == explicit.usage.input_tokens
    assert after.output_text == explicit.output_text


def test_worker_death_mid_stream_ends_with_response_failed(redis_server: RedisServer, tmp_path: Path) -> None:
    # Processes of its own: the worker it kills must not linger in the shared stack's namespace.
    ns = new_namespace()
    worker = Worker(redis_server.url, ns, ["echo"], tmp_path / "worker.log", OLLM_ECHO_TOKEN_DELAY="0.1")
    server = Server(redis_server.url, ns, tmp_path / "server.log", OLLM_SERVER__WORKER_LOST_SECONDS="2")
    try:
        worker.wait_ready()
        events = _stream_until_killed(server.wait_ready().openai_client(), worker)
    finally:
        server.stop()
        worker.stop()
    assert events[0].type == "response.created" and events[-1].type == "response.failed"
    failed = events[-1].response
    assert failed.status == "failed" and failed.error is not None and "stopped responding" in failed.error.message


def _stream_until_killed(client: openai.OpenAI, worker: Worker) -> list[Any]:
    """A long echo stream whose worker is killed after its third delta; every event the client saw."""
    long_input = " ".join(f"word{i}" for i in range(200))
    events: list[Any] = []
    for event in client.responses.create(model="echo", input=long_input, stream=True):
        events.append(event)
        if sum(e.type == "response.output_text.delta" for e in events) == 3:
            threading.Thread(target=worker.kill9).start()
    return events


def test_store_disabled_names_the_setting(live: Live, tmp_path: Any) -> None:
    server = Server(
        live.redis_url, live.namespace, tmp_path / "nostore.log", OLLM_SERVER__RESPONSE_STORE_BACKEND="none"
    ).wait_ready()
    try:
        client = server.openai_client()
        made = client.responses.create(model=MODEL, input="Hi", max_output_tokens=2)
        assert made.status in ("completed", "incomplete")
        for call in (
            lambda: httpx.get(f"{server.url}/v1/responses/{made.id}"),
            lambda: httpx.delete(f"{server.url}/v1/responses/{made.id}"),
            lambda: httpx.post(
                f"{server.url}/v1/responses", json={"model": MODEL, "input": "x", "previous_response_id": made.id}
            ),
        ):
            answer = call()
            assert answer.status_code == 400
            assert "server.response_store_backend" in answer.json()["error"]["message"]
    finally:
        server.stop()
