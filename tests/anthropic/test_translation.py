"""The Anthropic Messages translator, pure: requests in, internal requests out; events in, Anthropic
messages and typed SSE events out, checked against the `anthropic` SDK's own types and its stream
parser (fed through an in-memory transport, no server)."""

from __future__ import annotations

import json
from typing import Any

import anthropic
import httpx2
import pytest
from anthropic.types import Message as SDKMessage
from anthropic.types import RawMessageStreamEvent
from pydantic import TypeAdapter, ValidationError

from ollm.errors import InvalidRequestError
from ollm.generation import ErrorEvent, Event, FinalEvent, GenerationRequest, Timings, TokenEvent, Usage
from ollm.settings import GenerationSettings
from server.anthropic.errors import error_body
from server.anthropic.protocol import CountTokensRequest, MessagesRequest
from server.anthropic.serving import StreamFrames, count_request, from_messages_request, to_message
from tests.engine_output import split_final, token_events

DEFAULTS = GenerationSettings(max_new_tokens=50, temperature=0.5)
WEATHER = {
    "name": "get_weather",
    "description": "Weather in a city",
    "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
}
TIME = {"name": "get_time", "input_schema": {"type": "object", "properties": {}}}
CALL_TEXT = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
HI = [{"role": "user", "content": "hi"}]
PNG = "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mP8z8BQDwAEhQGAhKmMIQAAAABJRU5ErkJggg=="
_EVENTS = TypeAdapter[Any](RawMessageStreamEvent)


def body(**fields: Any) -> MessagesRequest:
    return MessagesRequest.model_validate({"model": "m", "max_tokens": 20, "messages": HI, **fields})


def translate(**fields: Any) -> GenerationRequest:
    return from_messages_request(body(**fields), DEFAULTS)


def final(text: str, reason: str = "stop", stop: str | None = None, prompt: int = 7, completion: int = 3) -> FinalEvent:
    usage = Usage(prompt_tokens=prompt, completion_tokens=completion)
    return split_final(text, finish_reason=reason, usage=usage, timings=Timings(), stop_sequence=stop)


def invalid(**fields: Any) -> str:
    with pytest.raises(ValidationError) as raised:
        body(**fields)
    return str(raised.value)


# ---- requests --------------------------------------------------------------------------------


def test_system_sampling_and_stops_map_onto_the_internal_request() -> None:
    request = translate(
        system="Be brief.", temperature=0.2, top_p=0.9, top_k=40, stop_sequences=["\n\n", "END"],
        metadata={"user_id": "u-1"}, max_tokens=33,
    )  # fmt: skip
    assert request.messages is not None
    assert [(m.role, m.text()) for m in request.messages] == [("system", "Be brief."), ("user", "hi")]
    sampling = request.sampling
    assert (sampling.max_new_tokens, sampling.temperature, sampling.top_p, sampling.top_k) == (33, 0.2, 0.9, 40)
    assert sampling.stop == ["\n\n", "END"]
    assert request.tools is None and request.constraint is None
    # What the client left out comes from the [generation] defaults.
    assert translate().sampling.temperature == 0.5


def test_system_blocks_and_text_and_image_blocks() -> None:
    content = [
        {"type": "text", "text": "What is this?", "cache_control": {"type": "ephemeral"}},
        {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": PNG}},
    ]
    request = translate(
        system=[{"type": "text", "text": "One."}, {"type": "text", "text": "Two."}],
        messages=[{"role": "user", "content": content}],
    )
    assert request.messages is not None
    system, user = request.messages
    assert system.text() == "One.\n\nTwo."
    assert user.text() == "What is this?" and user.images() == [f"data:image/png;base64,{PNG}"]


def test_images_by_url_must_be_inline() -> None:
    inline = {"type": "image", "source": {"type": "url", "url": f"data:image/png;base64,{PNG}"}}
    assert translate(messages=[{"role": "user", "content": [inline]}]).messages[0].images()  # type: ignore[index]
    remote = {"type": "image", "source": {"type": "url", "url": "https://example.com/cat.png"}}
    with pytest.raises(InvalidRequestError, match="data: URI") as raised:
        translate(messages=[{"role": "user", "content": [remote]}])
    assert raised.value.param == "messages.0.content"


def test_tool_round_trip_messages() -> None:
    messages = [
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": [
            {"type": "thinking", "thinking": "...", "signature": "s"},
            {"type": "text", "text": "Let me look."},
            {"type": "tool_use", "id": "toolu_1", "name": "get_weather", "input": {"city": "Paris"}},
        ]},
        {"role": "user", "content": [
            {"type": "tool_result", "tool_use_id": "toolu_1", "content": [{"type": "text", "text": "18C, sunny"}]},
            {"type": "text", "text": "Thanks."},
        ]},
        {"role": "assistant", "content": [{"type": "tool_use", "id": "toolu_2", "name": "get_weather", "input": {}}]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_2", "content": "no city",
                                      "is_error": True}]},
    ]  # fmt: skip
    request = translate(messages=messages, tools=[WEATHER])
    assert request.messages is not None
    assert [m.role for m in request.messages] == ["user", "assistant", "tool", "user", "assistant", "tool"]
    assistant, result = request.messages[1], request.messages[2]
    assert assistant.text() == "Let me look."
    calls = [(c.id, c.name, c.arguments) for c in assistant.tool_calls]
    assert calls == [("toolu_1", "get_weather", {"city": "Paris"})]
    assert (result.tool_call_id, result.name, result.text()) == ("toolu_1", "get_weather", "18C, sunny")
    assert request.messages[3].text() == "Thanks."
    failed = request.messages[5]
    assert failed.tool_call_id == "toolu_2" and failed.text() == "Error: no city"


def test_tool_choice_maps_onto_the_shared_tool_plan() -> None:
    auto = translate(tools=[WEATHER, TIME])
    assert auto.tools is not None and auto.constraint is None
    assert auto.tools[0]["function"]["parameters"] == WEATHER["input_schema"]
    assert translate(tools=[WEATHER], tool_choice={"type": "auto"}).constraint is None
    # none: the tools are not even offered, so the model cannot call one.
    none = translate(tools=[WEATHER], tool_choice={"type": "none"})
    assert none.tools is None and none.constraint is None
    # any / tool: the grammar makes a call the only possible output.
    forced = translate(tools=[WEATHER, TIME], tool_choice={"type": "any"})
    assert forced.constraint is not None and forced.constraint.prefix.startswith("<tool_call>")
    assert {v["properties"]["name"]["const"] for v in forced.constraint.json_schema["anyOf"]} == {  # type: ignore[index]
        "get_weather", "get_time",
    }  # fmt: skip
    named = translate(tools=[WEATHER, TIME], tool_choice={"type": "tool", "name": "get_weather"})
    assert named.constraint is not None and named.constraint.json_schema is not None
    assert named.constraint.json_schema["properties"]["arguments"] == WEATHER["input_schema"]


def test_output_format_is_a_json_schema_constraint_and_a_forced_tool_wins() -> None:
    schema = {"type": "object", "properties": {"answer": {"type": "string"}}, "required": ["answer"]}
    constrained = translate(output_config={"format": {"type": "json_schema", "schema": schema}, "effort": "low"})
    assert constrained.constraint is not None
    assert (constrained.constraint.type, constrained.constraint.json_schema) == ("json_schema", schema)
    beta = translate(output_format={"type": "json_schema", "schema": schema})
    assert beta.constraint == constrained.constraint
    both = translate(
        output_config={"format": {"type": "json_schema", "schema": schema}},
        tools=[WEATHER], tool_choice={"type": "tool", "name": "get_weather"},
    )  # fmt: skip
    assert both.constraint is not None and both.constraint.prefix.startswith("<tool_call>")


def test_thinking_config_is_think_and_its_budget() -> None:
    assert (translate().think, translate().reasoning_budget) == (None, None)
    enabled = translate(thinking={"type": "enabled", "budget_tokens": 2048})
    assert (enabled.think, enabled.reasoning_budget) == (True, 2048)
    assert translate(thinking={"type": "disabled"}).think is False
    assert translate(thinking={"type": "adaptive"}).think is None


@pytest.mark.parametrize(
    ("fields", "says"),
    [
        ({"max_tokens": 0}, "max_tokens"),
        ({"max_tokens": None}, "max_tokens"),
        ({"messages": []}, "messages"),
        ({"temperature": 1.5}, "temperature"),
        ({"stop_sequences": [""]}, "stop_sequences"),
        ({"tool_choice": {"type": "any"}}, "needs tools"),
        ({"tools": [WEATHER], "tool_choice": {"type": "tool", "name": "nope"}}, "'nope', which is not in tools"),
        ({"tools": [{"type": "web_search_20250305", "name": "web_search"}]}, "server tools"),
        ({"tools": [{"name": "x", "input_schema": {"type": "string"}}]}, '"type": "object"'),
        ({"messages": [{"role": "user", "content": [{"type": "document", "source": {}}]}]}, "document"),
        ({"messages": [{"role": "user", "content": [{"type": "tool_use", "id": "a", "name": "b", "input": {}}]}]},
         "tool_result"),
        ({"messages": [{"role": "system", "content": "x"}]}, "role"),
        ({"thinking": {"type": "sometimes"}}, "thinking"),
    ],
)  # fmt: skip
def test_bad_requests_fail_validation_naming_the_field(fields: dict[str, Any], says: str) -> None:
    assert says in invalid(**fields)


def test_count_request_renders_the_same_prompt_for_one_token() -> None:
    fields: dict[str, Any] = {"system": "S", "tools": [WEATHER], "tool_choice": {"type": "any"}}
    real = translate(**fields, stop_sequences=["x"])
    counted = count_request(CountTokensRequest.model_validate({"model": "m", "messages": HI, **fields}))
    assert counted.messages == real.messages and counted.tools == real.tools
    assert counted.constraint is None and counted.sampling.max_new_tokens == 1 and counted.sampling.greedy


# ---- responses -------------------------------------------------------------------------------


def sdk_message(request: GenerationRequest, event: FinalEvent) -> SDKMessage:
    return SDKMessage.model_validate(to_message(request, event).model_dump(mode="json"))


def test_messages_and_stop_reasons() -> None:
    request = translate(stop_sequences=["END"])
    plain = sdk_message(request, final("Hello there."))
    assert plain.type == "message" and plain.role == "assistant" and plain.id.startswith("msg_")
    assert [(b.type, getattr(b, "text", None)) for b in plain.content] == [("text", "Hello there.")]
    assert (plain.stop_reason, plain.stop_sequence) == ("end_turn", None)
    assert (plain.usage.input_tokens, plain.usage.output_tokens) == (7, 3)
    assert sdk_message(request, final("Hel", "length")).stop_reason == "max_tokens"
    stopped = sdk_message(request, final("Hel", stop="END"))
    assert (stopped.stop_reason, stopped.stop_sequence) == ("stop_sequence", "END")
    # An empty answer is still one (empty) text block, as the stream always opens one.
    assert [b.type for b in sdk_message(request, final("")).content] == ["text"]


def test_tool_use_blocks_out() -> None:
    request = translate(tools=[WEATHER])
    message = sdk_message(request, final(f"Checking.\n{CALL_TEXT}"))
    assert message.stop_reason == "tool_use"
    text, call = message.content
    assert text.type == "text" and text.text == "Checking."
    assert call.type == "tool_use" and call.name == "get_weather" and call.input == {"city": "Paris"}
    assert call.id.startswith("toolu_")
    only = sdk_message(request, final(CALL_TEXT))
    assert [b.type for b in only.content] == ["tool_use"]
    # Without tools offered (tool_choice none) the same text is just text.
    offered_none = translate(tools=[WEATHER], tool_choice={"type": "none"})
    assert offered_none.tools is None
    plain = split_final(CALL_TEXT, tools=False, finish_reason="stop", usage=Usage(), timings=Timings())
    assert sdk_message(offered_none, plain).content[0].type == "text"


# ---- streams ---------------------------------------------------------------------------------


def stream_body(request: GenerationRequest, events: list[Event]) -> str:
    frames = StreamFrames(request)
    return frames.start() + "".join(text for event in events for text in frames(event))


def parsed(body: str) -> list[tuple[str, Any]]:
    """(event name, validated SDK event) per SSE event; the name always equals the data's type."""
    out = []
    for raw in body.strip().split("\n\n"):
        name = raw.split("\n")[0].removeprefix("event: ")
        data = json.loads(raw.split("\n")[1].removeprefix("data: "))
        assert data["type"] == name
        # The SDK models every event but the keep-alive ping and the error (which it raises).
        out.append((name, data if name in ("ping", "error") else _EVENTS.validate_python(data)))
    return out


def sdk_stream(request: GenerationRequest, events: list[Event]) -> anthropic.MessageStream:
    """The SDK's own streaming helper, reading our frames as if from a server."""
    wire = stream_body(request, events).encode()
    transport = httpx2.MockTransport(
        lambda _: httpx2.Response(200, headers={"content-type": "text/event-stream"}, content=wire)
    )
    http = httpx2.Client(transport=transport)
    client = anthropic.Anthropic(api_key="k", base_url="http://ollm.test", http_client=http)
    return client.messages.stream(model="m", max_tokens=20, messages=HI).__enter__()


def test_text_stream_is_in_anthropic_order_and_the_sdk_rebuilds_the_message() -> None:
    request = translate(stop_sequences=["END"])
    events: list[Event] = [TokenEvent(text="Hel"), TokenEvent(text="lo"), final("Hello", stop="END")]
    names = [name for name, _ in parsed(stream_body(request, events))]
    assert names == [
        "message_start", "content_block_start", "ping", "content_block_delta", "content_block_delta",
        "content_block_stop", "message_delta", "message_stop",
    ]  # fmt: skip
    stream = sdk_stream(request, events)
    assert "".join(stream.text_stream) == "Hello"
    message = stream.get_final_message()
    expected = sdk_message(request, final("Hello", stop="END"))
    assert message.model_dump(exclude={"id"}) == expected.model_dump(exclude={"id"})


def test_tool_call_stream_has_a_tool_use_block_with_its_input() -> None:
    request = translate(tools=[WEATHER])
    pieces = ["\n", *[CALL_TEXT[i : i + 7] for i in range(0, len(CALL_TEXT), 7)]]
    events: list[Event] = [*token_events(pieces), final("\n" + CALL_TEXT)]
    frames = parsed(stream_body(request, events))
    assert [name for name, _ in frames] == [
        "message_start", "content_block_start", "ping", "content_block_delta", "content_block_stop",
        "message_delta", "message_stop",
    ]  # fmt: skip
    start, delta = frames[1][1], frames[3][1]
    assert start.content_block.type == "tool_use" and start.content_block.input == {}
    assert json.loads(delta.delta.partial_json) == {"city": "Paris"}
    message = sdk_stream(request, events).get_final_message()
    assert message.stop_reason == "tool_use" and message.usage.input_tokens == 7
    expected = sdk_message(request, final("\n" + CALL_TEXT))
    assert [(b.type, b.model_dump(exclude={"id"})) for b in message.content] == [
        (b.type, b.model_dump(exclude={"id"})) for b in expected.content
    ]


def test_the_sdk_stream_helpers_accumulate_the_tool_input_from_its_one_delta() -> None:
    # The whole input arrives as one input_json_delta (the grammar-checked call is parsed once it
    # is complete). What SDK users of messages.stream() read must still be whole: the helper's own
    # input_json event with its parsed snapshot, and the running message snapshot.
    request = translate(tools=[WEATHER])
    events: list[Event] = [*token_events([CALL_TEXT[:20], CALL_TEXT[20:]]), final(CALL_TEXT)]
    stream = sdk_stream(request, events)
    seen = list(stream)
    inputs = [event for event in seen if event.type == "input_json"]
    assert len(inputs) == 1 and inputs[0].snapshot == {"city": "Paris"}
    assert json.loads(inputs[0].partial_json) == {"city": "Paris"}
    (stopped,) = [event for event in seen if event.type == "content_block_stop"]
    assert stopped.content_block.type == "tool_use" and stopped.content_block.input == {"city": "Paris"}
    snapshot = stream.current_message_snapshot
    assert snapshot.stop_reason == "tool_use" and snapshot.content[0].input == {"city": "Paris"}  # type: ignore[union-attr]
    assert stream.get_final_message().content == snapshot.content


def test_text_then_a_call_are_two_blocks() -> None:
    request = translate(tools=[WEATHER])
    events: list[Event] = [*token_events(["Checking. ", CALL_TEXT]), final("Checking. " + CALL_TEXT)]
    frames = parsed(stream_body(request, events))
    starts = [event.content_block.type for name, event in frames if name == "content_block_start"]
    stops = [event.index for name, event in frames if name == "content_block_stop"]
    assert starts == ["text", "tool_use"] and stops == [0, 1]


def test_an_empty_answer_still_streams_one_block() -> None:
    request = translate()
    frames = parsed(stream_body(request, [final("", completion=1)]))
    assert [name for name, _ in frames][1:4] == ["content_block_start", "ping", "content_block_stop"]
    assert sdk_stream(request, [final("", completion=1)]).get_final_message().content[0].type == "text"


def test_errors_have_anthropic_shape_in_bodies_and_streams() -> None:
    assert error_body(400, "bad") == {"type": "error", "error": {"type": "invalid_request_error", "message": "bad"}}
    assert error_body(404, "x")["error"]["type"] == "not_found_error"
    assert error_body(401, "x")["error"]["type"] == "authentication_error"
    assert error_body(503, "x")["error"]["type"] == "overloaded_error"
    assert error_body(500, "x")["error"]["type"] == "api_error"
    request = translate()
    events: list[Event] = [TokenEvent(text="Hi"), ErrorEvent(message="worker lost", status=503, code="worker_lost")]
    name, data = parsed(stream_body(request, events))[-1]
    assert name == "error" and data == error_body(503, "worker lost")
    with pytest.raises(anthropic.APIStatusError, match="worker lost"):
        sdk_stream(request, events).get_final_message()
