"""The Anthropic Messages API through the `anthropic` SDK against a live stack (real redis-server,
`ollm worker` on the real default chat model, `ollm serve`). Properties only, never the model's words.

The SDK takes no sampling arguments any more; clients still send them in the body (extra_body).
"""

from __future__ import annotations

import json
from typing import Any

import anthropic
import httpx
import jsonschema
import pytest
from anthropic.types import TextBlock, ToolUseBlock

from tests.anthropic.conftest import sdk_client
from tests.conftest import CITY_SCHEMA, DEFAULT_CHAT_MODEL
from tests.integration.harness import Live, Server, sse_events

pytestmark = pytest.mark.slow

MODEL = DEFAULT_CHAT_MODEL
GREEDY: Any = {"temperature": 0}
FRANCE: Any = [{"role": "user", "content": "What is the capital of France?"}]
COUNT: Any = [{"role": "user", "content": "Count from 1 to 10, separated by commas."}]
WEATHER: Any = {
    "name": "get_weather",
    "description": "Get the current weather in a city",
    "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
}
TIME: Any = {"name": "get_time", "description": "Get the current time", "input_schema": {"type": "object"}}
STREAM_ORDER = [
    "message_start", "content_block_start", "ping", "content_block_delta", "content_block_stop", "message_delta",
    "message_stop",
]  # fmt: skip


def text_of(message: anthropic.types.Message) -> str:
    return "".join(block.text for block in message.content if isinstance(block, TextBlock))


def test_plain_and_streamed_agree(live: Live, client: anthropic.Anthropic) -> None:
    plain = client.messages.create(
        model=MODEL, max_tokens=16, messages=FRANCE, system=[{"type": "text", "text": "Answer briefly."}],
        metadata={"user_id": "user-1"}, thinking={"type": "enabled", "budget_tokens": 1024}, extra_body=GREEDY,
    )  # fmt: skip
    assert plain.type == "message" and plain.role == "assistant" and plain.model == MODEL
    assert text_of(plain) and plain.stop_reason in ("end_turn", "max_tokens")
    assert plain.usage.input_tokens > 0 and 0 < plain.usage.output_tokens <= 16

    # The SDK's streaming helper: text as it comes, then the same message as the plain answer.
    with client.messages.stream(
        model=MODEL, max_tokens=16, messages=FRANCE, system=[{"type": "text", "text": "Answer briefly."}],
        extra_body=GREEDY,
    ) as stream:  # fmt: skip
        streamed_text = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert streamed_text == text_of(plain) == text_of(final)
    assert (final.stop_reason, final.usage) == (plain.stop_reason, plain.usage)

    # On the wire: Anthropic's typed events, each named by its type, in Anthropic's order.
    body = {"model": MODEL, "max_tokens": 16, "messages": FRANCE, "system": "Answer briefly.", "stream": True, **GREEDY}
    with httpx.stream("POST", f"{live.server.url}/v1/messages", json=body, timeout=120) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        events = [(name, json.loads(data)) for name, data in sse_events(response.iter_lines())]
    assert all(name == data["type"] for name, data in events)
    names = [name for name, _ in events]
    collapsed = [name for i, name in enumerate(names) if i == 0 or name != names[i - 1]]
    assert collapsed == STREAM_ORDER
    delta = events[-2][1]
    assert delta["delta"]["stop_reason"] == plain.stop_reason
    assert (delta["usage"]["input_tokens"], delta["usage"]["output_tokens"]) == (
        plain.usage.input_tokens, plain.usage.output_tokens,
    )  # fmt: skip


def test_stop_sequences_and_max_tokens(client: anthropic.Anthropic) -> None:
    full = client.messages.create(model=MODEL, max_tokens=40, messages=COUNT, extra_body=GREEDY)
    # A semantic anchor that holds on every kernel: asked to count to 10, the model writes a 4.
    assert "4" in text_of(full)
    stopped = client.messages.create(
        model=MODEL, max_tokens=40, messages=COUNT, stop_sequences=["4"], extra_body=GREEDY
    )
    assert (stopped.stop_reason, stopped.stop_sequence) == ("stop_sequence", "4")
    assert "4" not in text_of(stopped) and text_of(full).startswith(text_of(stopped))
    short = client.messages.create(model=MODEL, max_tokens=3, messages=COUNT, extra_body={"top_k": 5, "top_p": 0.9})
    assert (short.stop_reason, short.stop_sequence, short.usage.output_tokens) == ("max_tokens", None, 3)


def test_json_schema_output_validates(client: anthropic.Anthropic) -> None:
    schema = CITY_SCHEMA
    answer = client.messages.create(
        model=MODEL, max_tokens=80, messages=[{"role": "user", "content": "Describe Paris as JSON."}],
        output_config={"format": {"type": "json_schema", "schema": schema}}, extra_body=GREEDY,
    )  # fmt: skip
    assert answer.stop_reason == "end_turn"
    jsonschema.validate(json.loads(text_of(answer)), schema)


def test_tool_round_trip(client: anthropic.Anthropic) -> None:
    question: Any = [{"role": "user", "content": "What is the weather like in Paris?"}]
    # A named tool, forced: the grammar makes its call the only possible output.
    answer = client.messages.create(
        model=MODEL, max_tokens=40, messages=question, tools=[TIME, WEATHER],
        tool_choice={"type": "tool", "name": "get_weather"}, extra_body=GREEDY,
    )  # fmt: skip
    assert answer.stop_reason == "tool_use"
    (call,) = [block for block in answer.content if isinstance(block, ToolUseBlock)]
    assert call.name == "get_weather" and call.id
    jsonschema.validate(call.input, WEATHER["input_schema"])

    # "any", streamed: the call arrives as a tool_use block whose input comes as input_json_delta.
    with client.messages.stream(
        model=MODEL, max_tokens=40, messages=question, tools=[WEATHER], tool_choice={"type": "any"}, extra_body=GREEDY
    ) as stream:
        events = list(stream)
        streamed = stream.get_final_message()
    assert any(e.type == "content_block_delta" and e.delta.type == "input_json_delta" for e in events)
    assert streamed.stop_reason == "tool_use" and [b.type for b in streamed.content] == ["tool_use"]
    jsonschema.validate(streamed.content[0].input, WEATHER["input_schema"])  # type: ignore[union-attr]

    # The result goes back as a tool_result block; with tool_choice none the model answers in text.
    conversation: Any = [
        *question,
        answer.to_param(),
        {"role": "user", "content": [
            {"type": "tool_result", "tool_use_id": call.id, "content": "Sunny and 18 degrees Celsius."},
        ]},
    ]  # fmt: skip
    reply = client.messages.create(
        model=MODEL, max_tokens=24, messages=conversation, tools=[TIME, WEATHER], tool_choice={"type": "none"},
        extra_body=GREEDY,
    )  # fmt: skip
    assert reply.stop_reason in ("end_turn", "max_tokens") and [b.type for b in reply.content] == ["text"]
    # The result is rendered into the prompt: a longer result makes a longer prompt. What the model
    # then says is its own, and differs between CPUs' kernels.
    conversation[-1]["content"][0]["content"] = "Sunny and 18 degrees Celsius, with a light wind from the west."
    longer = client.messages.count_tokens(
        model=MODEL, messages=conversation, tools=[TIME, WEATHER], tool_choice={"type": "none"}
    )
    assert longer.input_tokens > reply.usage.input_tokens


def test_count_tokens_equals_the_input_tokens_of_the_same_request(client: anthropic.Anthropic) -> None:
    request: Any = {
        "model": MODEL, "messages": FRANCE, "system": "You are a geography teacher.", "tools": [WEATHER],
    }  # fmt: skip
    counted = client.messages.count_tokens(**request)
    answer = client.messages.create(**request, max_tokens=4, extra_body=GREEDY)
    assert counted.input_tokens == answer.usage.input_tokens > 0
    # Tools are part of the prompt, so they are counted.
    without_tools = client.messages.count_tokens(model=MODEL, messages=FRANCE, system="You are a geography teacher.")
    assert without_tools.input_tokens < counted.input_tokens


PNG = "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mP8z8BQDwAEhQGAhKmMIQAAAABJRU5ErkJggg=="
IMAGE: Any = {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": PNG}}


BOTH = ("/v1/messages", "/v1/messages/count_tokens")
MESSAGES = ("/v1/messages",)


@pytest.mark.parametrize(
    ("paths", "body", "status", "says"),
    [
        (MESSAGES, {"model": MODEL, "messages": FRANCE}, 400, "max_tokens"),
        (MESSAGES, {"model": MODEL, "max_tokens": 8, "messages": FRANCE, "temperature": 5}, 400, "temperature"),
        (BOTH, {"model": MODEL, "max_tokens": 8, "messages": []}, 400, "messages"),
        (BOTH, {"model": MODEL, "max_tokens": 8, "messages": FRANCE, "tool_choice": {"type": "any"}}, 400,
         "needs tools"),
        # Checked by the worker, which knows its model has no vision.
        (BOTH, {"model": MODEL, "max_tokens": 8, "messages": [{"role": "user", "content": [IMAGE]}]}, 400, MODEL),
        (BOTH, {"model": MODEL, "max_tokens": 8, "messages": FRANCE, "tools": [{"type": "bash_20250124", "name": "b"}]},
         400, "server tools"),
        (BOTH, {"model": "no-such-model", "max_tokens": 8, "messages": FRANCE}, 404, "no-such-model"),
    ],
)  # fmt: skip
def test_bad_input_gets_an_anthropic_error(
    live: Live, paths: tuple[str, ...], body: dict[str, Any], status: int, says: str
) -> None:
    for path in paths:
        answer = httpx.post(f"{live.server.url}{path}", json=body, timeout=60)
        assert answer.status_code == status, answer.text
        error = answer.json()
        assert set(error) == {"type", "error"} and error["type"] == "error"
        assert error["error"]["type"] == ("not_found_error" if status == 404 else "invalid_request_error")
        assert says in error["error"]["message"]


def test_the_sdk_raises_its_typed_errors(live: Live, client: anthropic.Anthropic) -> None:
    with pytest.raises(anthropic.BadRequestError) as bad:
        client.messages.create(model=MODEL, max_tokens=8, messages=[])
    assert bad.value.status_code == 400 and bad.value.type == "invalid_request_error"
    not_json = httpx.post(
        f"{live.server.url}/v1/messages", content=b"{nope", headers={"content-type": "application/json"}, timeout=30
    )
    assert not_json.status_code == 400 and not_json.json()["error"]["type"] == "invalid_request_error"


def test_api_key_in_either_header(live: Live, tmp_path_factory: pytest.TempPathFactory) -> None:
    key = "s3cret-key"
    guarded = Server(
        live.redis_url, live.namespace, tmp_path_factory.mktemp("guarded") / "server.log", OLLM_SERVER__API_KEY=key
    ).wait_ready()
    try:
        ask: Any = {"model": MODEL, "max_tokens": 4, "messages": FRANCE, "extra_body": GREEDY}
        by_x_api_key = sdk_client(guarded.url, api_key=key).messages.create(**ask)
        by_bearer = sdk_client(guarded.url, auth_token=key).messages.create(**ask)
        assert text_of(by_x_api_key) == text_of(by_bearer)
        with pytest.raises(anthropic.AuthenticationError) as refused:
            sdk_client(guarded.url, api_key="wrong").messages.count_tokens(model=MODEL, messages=FRANCE)
        assert refused.value.status_code == 401 and refused.value.type == "authentication_error"
        # The other /v1 routes keep OpenAI's error shape.
        openai_shape = httpx.post(f"{guarded.url}/v1/chat/completions", json={}, timeout=30).json()
        assert openai_shape["error"]["code"] == "invalid_api_key"
    finally:
        guarded.stop()
