"""The OpenAI translators as pure functions: no server, no Redis, no model."""

from __future__ import annotations

import asyncio
import base64
import json
from typing import Any, cast

import numpy as np
import pytest
import redis
from openai.types import Completion
from openai.types.chat import ChatCompletion, ChatCompletionChunk
from openai.types.responses import Response, ResponseStreamEvent
from pydantic import TypeAdapter, ValidationError

from ollm.contract import WorkerInfo
from ollm.errors import InvalidRequestError
from ollm.generation import (
    EmbeddingResult,
    ErrorEvent,
    FinalEvent,
    GenerationRequest,
    Timings,
    TokenEvent,
    TokenLogprob,
    TopLogprob,
    Usage,
)
from ollm.settings import GenerationSettings
from ollm.tools import tool_plan
from server.dispatch import Completed
from server.errors import event_from_error
from server.openai.chat_completion.protocol import ChatCompletionRequest
from server.openai.chat_completion.serving import chunk_frames, first_chunk, from_chat_request, to_chat_completion
from server.openai.common import fan_out, finish_reason, parse_arguments, stop_list
from server.openai.completion.protocol import CompletionRequest
from server.openai.completion.serving import CompletionFrames, from_completion_request, to_completion
from server.openai.embeddings.protocol import EmbeddingRequest
from server.openai.embeddings.serving import from_embedding_request, to_embedding_response
from server.openai.models.serving import to_models
from server.openai.responses.protocol import ResponseRequest
from server.openai.responses.serving import ResponseBuilder, StreamFrames, from_response_request
from server.stores.responses import ResponseStore
from server.translation import image_part
from tests.engine_output import split_final, token_events

DEFAULTS = GenerationSettings(max_new_tokens=50, temperature=0.5)
TOOLS: list[dict[str, Any]] = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Weather in a city",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
        },
    },
    {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object", "properties": {}}}},
]
CALL_TEXT = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
USER = [{"role": "user", "content": "hi"}]


def final(text: str, reason: str = "stop", prompt: int = 4, completion: int = 3) -> FinalEvent:
    """The final event of a model that wrote ``text`` (tool markup split out as the engine does)."""
    usage = Usage(prompt_tokens=prompt, completion_tokens=completion)
    return split_final(text, finish_reason=reason, usage=usage, timings=Timings())


def data_of(frame: str) -> Any:
    line = [line for line in frame.splitlines() if line.startswith("data: ")][0]
    return json.loads(line[len("data: ") :])


def chat(body: dict[str, Any]) -> GenerationRequest:
    return from_chat_request(ChatCompletionRequest.model_validate({"model": "m", "messages": USER, **body}), DEFAULTS)


# ---- common ----------------------------------------------------------------------------------


def test_common_helpers() -> None:
    assert stop_list("x") == ["x"] and stop_list(None) is None and stop_list(["a", "b"]) == ["a", "b"]
    with pytest.raises(InvalidRequestError):
        stop_list([""])
    assert finish_reason("cancelled") == "stop" and finish_reason("length") == "length"
    assert finish_reason("stop", called_tools=True) == "tool_calls"
    assert image_part("data:image/png;base64,AA", "p").image == "data:image/png;base64,AA"
    with pytest.raises(InvalidRequestError, match="data: URI"):
        image_part("https://example.com/cat.png", "p")
    assert parse_arguments('{"a": 1}', "p") == {"a": 1}
    for bad in ("{nope", "[1]"):
        with pytest.raises(InvalidRequestError):
            parse_arguments(bad, "p")


def test_tool_plans() -> None:
    assert tool_plan(None, None).tools is None
    auto = tool_plan(TOOLS, None)
    assert auto.choice == "auto" and auto.tools == TOOLS and auto.constraint is None and auto.parses
    none = tool_plan(TOOLS, "none")
    assert none.tools is None and not none.parses  # not offered, not parsed
    required = tool_plan(TOOLS, "required")
    assert required.constraint is not None and required.constraint.prefix.startswith("<tool_call>")
    named = tool_plan(TOOLS, "get_time")
    assert named.constraint is not None and named.constraint.json_schema is not None
    assert named.constraint.json_schema["properties"]["name"] == {"const": "get_time"}
    with pytest.raises(InvalidRequestError, match="not in tools"):
        tool_plan(TOOLS, "launch_rocket")
    with pytest.raises(InvalidRequestError, match="needs tools"):
        tool_plan(None, "required")


def test_fan_out_seeds_each_choice() -> None:
    request = chat({"seed": 7})
    copies = fan_out(request, 3)
    assert [c.sampling.seed for c in copies] == [7, 8, 9]
    assert len({c.id for c in copies}) == 3
    assert fan_out(request, 1) == [request]


# ---- chat completions ------------------------------------------------------------------------


def test_chat_named_tool_choice_forces_a_call_and_none_offers_no_tools() -> None:
    named = chat({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "get_weather"}}})
    assert named.tools is not None and named.constraint is not None and named.constraint.suffix.endswith("</tool_call>")
    # A forced call wins over a response_format.
    both = chat({"tools": TOOLS, "tool_choice": "required", "response_format": {"type": "json_object"}})
    assert both.constraint is not None and both.constraint.type == "json_schema"
    assert chat({"tools": TOOLS, "tool_choice": "none"}).tools is None
    with pytest.raises(ValidationError):
        ChatCompletionRequest.model_validate({"model": "m", "messages": USER, "tools": [{"type": "retrieval"}]})
    with pytest.raises(ValidationError, match="tool_call_id"):
        ChatCompletionRequest.model_validate({"model": "m", "messages": [{"role": "tool", "content": "x"}]})


def test_chat_completion_with_tool_calls_and_several_choices() -> None:
    request = chat({"tools": TOOLS, "n": 2, "logprobs": True})
    top = [TopLogprob(token="<", token_id=1, logprob=-0.1)]
    logprobs = [TokenLogprob(token="<", token_id=1, logprob=-0.1, top=top)]
    more = [Completed(final("plain answer", "length", completion=5), [])]
    completion = to_chat_completion(request, final(CALL_TEXT), logprobs, created=1, more=more)
    wire = ChatCompletion.model_validate(completion.model_dump(mode="json"))
    first, second = wire.choices
    assert first.finish_reason == "tool_calls" and first.message.content is None
    assert first.message.tool_calls is not None
    call = first.message.tool_calls[0]
    assert call.type == "function" and call.function.name == "get_weather"
    assert json.loads(call.function.arguments) == {"city": "Paris"}
    assert second.index == 1 and second.message.content == "plain answer" and second.finish_reason == "length"
    assert wire.usage is not None and wire.usage.prompt_tokens == 4 and wire.usage.completion_tokens == 8


def test_chat_stream_turns_tool_markup_into_call_deltas() -> None:
    request = chat({"tools": TOOLS})
    frames = chunk_frames(request, created=1, include_usage=False)
    out: list[str] = []
    # Markup split across tokens never reaches the client as content.
    pieces = ["Sure. ", "<tool", "_call>\n", '{"name": "get_weather", ', '"arguments": {"city": "Paris"}}']
    pieces.append("\n</tool_call>")
    for event in token_events(pieces):
        out += frames(event)
    out += frames(final("ignored"))
    chunks = [ChatCompletionChunk.model_validate(data_of(frame)) for frame in out]
    content = "".join(c.choices[0].delta.content or "" for c in chunks)
    assert content == "Sure. "
    deltas = [tc for c in chunks for tc in c.choices[0].delta.tool_calls or []]
    assert deltas[0].id and deltas[0].function is not None and deltas[0].function.name == "get_weather"
    arguments = "".join(d.function.arguments or "" for d in deltas if d.function is not None)
    assert json.loads(arguments) == {"city": "Paris"}
    assert chunks[-1].choices[0].finish_reason == "tool_calls"


def test_defaults_come_from_settings_and_client_values_win() -> None:
    request = chat({"model": "m", "messages": [{"role": "user", "content": "hi"}]})
    assert request.sampling.max_new_tokens == 50 and request.sampling.temperature == 0.5
    request = chat(
        {
            "model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5,
            "max_completion_tokens": 7, "temperature": 0, "stop": "END", "seed": 3,
        }
    )  # fmt: skip
    assert request.sampling.max_new_tokens == 7  # the newer name wins
    assert request.sampling.greedy and request.sampling.stop == ["END"] and request.sampling.seed == 3


def test_messages_parts_and_tool_calls_translate() -> None:
    request = chat(
        {
            "model": "m",
            "messages": [
                {"role": "system", "content": "sys"},
                {"role": "user", "content": [
                    {"type": "text", "text": "look"},
                    {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}},
                ]},
                {"role": "assistant", "content": None, "tool_calls": [
                    {"id": "call_1", "type": "function", "function": {"name": "f", "arguments": '{"x": 1}'}},
                ]},
                {"role": "tool", "tool_call_id": "call_1", "content": "42"},
            ],
        }
    )  # fmt: skip
    assert request.messages is not None
    system, user, assistant, tool = request.messages
    assert user.text() == "look" and user.images() == ["data:image/png;base64,AAAA"]
    assert assistant.tool_calls[0].arguments == {"x": 1}
    assert tool.tool_call_id == "call_1" and tool.text() == "42"


def test_response_format_becomes_a_constraint() -> None:
    base = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
    assert chat({**base, "response_format": {"type": "text"}}).constraint is None
    constraint = chat({**base, "response_format": {"type": "json_object"}}).constraint
    assert constraint is not None and constraint.type == "json_object"
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}}
    json_schema = {"type": "json_schema", "json_schema": {"name": "x", "schema": schema}}
    constraint = chat({**base, "response_format": json_schema}).constraint
    assert constraint is not None and constraint.json_schema == schema
    with pytest.raises(InvalidRequestError):
        chat({**base, "response_format": {"type": "json_schema", "json_schema": {"name": "x"}}})


def test_bad_tool_call_arguments_are_a_client_error() -> None:
    bad = {"id": "c", "type": "function", "function": {"name": "f", "arguments": "{nope"}}
    with pytest.raises(InvalidRequestError, match="not JSON"):
        chat({"model": "m", "messages": [{"role": "assistant", "tool_calls": [bad]}]})


def test_to_chat_completion_is_a_valid_openai_object() -> None:
    request = chat({"model": "m", "messages": [{"role": "user", "content": "hi"}], "logprobs": True})
    logprobs = [TokenLogprob(token="hello", token_id=1, logprob=-0.5)]
    done = final("hello world", "cancelled", prompt=3, completion=2)
    completion = to_chat_completion(request, done, logprobs, created=1)
    wire = ChatCompletion.model_validate(completion.model_dump(mode="json"))
    assert wire.id == f"chatcmpl-{request.id}" and wire.choices[0].message.content == "hello world"
    assert wire.choices[0].finish_reason == "stop"  # OpenAI has no "cancelled"
    assert wire.usage is not None and wire.usage.total_tokens == 5
    assert wire.choices[0].logprobs is not None and wire.choices[0].logprobs.content is not None
    assert wire.choices[0].logprobs.content[0].logprob == -0.5


def test_stream_chunks() -> None:
    request = chat({"model": "m", "messages": [{"role": "user", "content": "hi"}]})
    frames = chunk_frames(request, created=1, include_usage=True)
    head_frame = first_chunk(request, 1)
    assert head_frame.startswith("data: ") and head_frame.endswith("\n\n")
    head = ChatCompletionChunk.model_validate(data_of(head_frame))
    assert head.choices[0].delta.role == "assistant"
    token = ChatCompletionChunk.model_validate(data_of(list(frames(TokenEvent(text="he")))[0]))
    ended = final("hello world", "length", prompt=3, completion=2)
    assert token.choices[0].delta.content == "he" and token.choices[0].finish_reason is None
    finish, usage = [ChatCompletionChunk.model_validate(data_of(f)) for f in frames(ended)]
    assert finish.choices[0].finish_reason == "length"
    assert usage.choices == [] and usage.usage is not None and usage.usage.completion_tokens == 2
    (error,) = frames(ErrorEvent(message="boom", status=503, code="worker_lost"))
    assert data_of(error)["error"] == {"message": "boom", "type": "server_error", "param": None, "code": "worker_lost"}


# ---- completions -----------------------------------------------------------------------------


def test_completions_prompts_choices_echo_suffix_and_logprobs() -> None:
    body = CompletionRequest.model_validate(
        {"model": "m", "prompt": ["A", "B"], "n": 2, "seed": 1, "echo": True, "suffix": "!"}
    )
    requests = from_completion_request(body, DEFAULTS)
    assert [r.prompt for r in requests] == ["A", "A", "B", "B"] and [r.sampling.seed for r in requests] == [1, 2, 1, 2]
    done = [Completed(final(f" x{i}"), []) for i in range(4)]
    wire = Completion.model_validate(to_completion(body, requests, done).model_dump(mode="json"))
    assert [c.text for c in wire.choices] == ["A x0!", "A x1!", "B x2!", "B x3!"]
    assert wire.usage is not None and wire.usage.prompt_tokens == 8 and wire.usage.completion_tokens == 12

    body = CompletionRequest.model_validate({"model": "m", "prompt": "A", "logprobs": 1})
    (request,) = from_completion_request(body, DEFAULTS)
    assert request.sampling.logprobs and request.sampling.top_logprobs == 1
    lp = [TokenLogprob(token=" x", token_id=5, logprob=-1.0, top=[TopLogprob(token=" x", token_id=5, logprob=-1.0)])]
    choice = to_completion(body, [request], [Completed(final(" x"), lp)]).choices[0]
    assert choice.logprobs is not None and choice.logprobs.tokens == [" x"]
    assert choice.logprobs.top_logprobs == [{" x": -1.0}] and choice.logprobs.text_offset == [0]

    bads: list[dict[str, Any]] = [{"prompt": [[1, 2]]}, {"prompt": []}, {"prompt": "A", "echo": True, "logprobs": 1}]
    for bad in bads:
        with pytest.raises(InvalidRequestError):
            from_completion_request(CompletionRequest.model_validate({"model": "m", **bad}), DEFAULTS)
    with pytest.raises(ValidationError, match="best_of"):
        CompletionRequest.model_validate({"model": "m", "prompt": "A", "best_of": 3})


def test_completion_stream_frames() -> None:
    usage = {"include_usage": True}
    body = CompletionRequest.model_validate(
        {"model": "m", "prompt": "A", "echo": True, "suffix": "!", "stream": True, "stream_options": usage}
    )
    (request,) = from_completion_request(body, DEFAULTS)
    frames = CompletionFrames(request, body, created=1, include_usage=True)
    out = frames.head() + list(frames(TokenEvent(text=" b"))) + list(frames(final(" b")))
    # Chunks carry finish_reason null until the end, which the SDK's (non-stream) Completion type forbids.
    chunks = [data_of(frame) for frame in out]
    assert all(c["object"] == "text_completion" and c["id"] == chunks[0]["id"] for c in chunks)
    assert "".join(c["choices"][0]["text"] for c in chunks if c["choices"]) == "A b!"
    assert [c["choices"][0]["finish_reason"] for c in chunks[:-1]] == [None, None, None, "stop"]
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 3
    (error,) = frames(ErrorEvent(message="boom", status=503, code="worker_lost"))
    assert data_of(error)["error"]["code"] == "worker_lost"


# ---- embeddings and models -------------------------------------------------------------------


def test_embedding_inputs_and_base64() -> None:
    def parse(value: Any) -> list[Any]:
        return list(from_embedding_request(EmbeddingRequest.model_validate({"input": value})).inputs)

    assert parse("a") == ["a"] and parse(["a", "b"]) == ["a", "b"]
    assert parse([1, 2, 3]) == [[1, 2, 3]] and parse([[1], [2, 3]]) == [[1], [2, 3]]
    assert EmbeddingRequest.model_validate({"input": "a"}).model == "all-minilm-l6-v2"
    for bad in ([], [""], ["a"] * 2049):
        with pytest.raises(InvalidRequestError):
            parse(bad)
    result = EmbeddingResult(model="m", embeddings=[[0.5, -0.25, 0.125]], prompt_tokens=3)
    encoded = to_embedding_response(result, "base64")["data"][0]["embedding"]
    assert np.frombuffer(base64.b64decode(encoded), dtype="<f4").tolist() == [0.5, -0.25, 0.125]
    floats = to_embedding_response(result, "float")
    assert floats["data"][0]["embedding"] == [0.5, -0.25, 0.125] and floats["usage"]["prompt_tokens"] == 3


def test_models_from_worker_heartbeats() -> None:
    workers = [
        WorkerInfo(name="a", host="h", pid=1, models=["m1", "m2"], started_at=200.0),
        WorkerInfo(name="b", host="h", pid=2, models=["m1"], started_at=100.0),
    ]
    models = to_models(workers)
    assert [(m.id, m.created, m.object, m.owned_by) for m in models] == [
        ("m1", 100, "model", "ollm"),
        ("m2", 200, "model", "ollm"),
    ]


# ---- responses -------------------------------------------------------------------------------

RESPONSE_TOOLS = [{"type": "function", "name": "get_weather", "parameters": TOOLS[0]["function"]["parameters"]}]


def responses(body: dict[str, Any], prior: list[Any] | None = None) -> ResponseBuilder:
    request = ResponseRequest.model_validate({"model": "m", **body})
    return ResponseBuilder(from_response_request(request, prior or [], DEFAULTS))


def test_responses_input_items_become_the_conversation() -> None:
    text_file = "data:text/plain;base64," + base64.b64encode(b"the code is 42").decode()
    builder = responses(
        {
            "instructions": "be brief",
            "tools": RESPONSE_TOOLS,
            "input": [
                {"role": "user", "content": [{"type": "input_text", "text": "read this"},
                                             {"type": "input_file", "filename": "a.txt", "file_data": text_file}]},
                {"type": "function_call", "call_id": "c1", "name": "get_weather", "arguments": '{"city": "Oslo"}'},
                {"type": "function_call_output", "call_id": "c1", "output": "sunny"},
            ],
        }
    )  # fmt: skip
    t = builder.t
    assert t.request.messages is not None
    system, user, call, result = t.request.messages
    assert system.role == "system" and system.text() == "be brief"
    assert "the code is 42" in user.text()
    assert call.role == "assistant" and call.tool_calls[0].arguments == {"city": "Oslo"}
    assert result.role == "tool" and result.name == "get_weather" and result.tool_call_id == "c1"
    # Instructions are not part of the conversation that a follow-up continues.
    assert [m.role for m in t.conversation] == ["user", "assistant", "tool"]
    assert [item["type"] for item in t.items] == ["message", "function_call", "function_call_output"]
    assert all(item["id"] for item in t.items)


def test_responses_bad_inputs() -> None:
    pdf = {"type": "input_file", "filename": "a.pdf", "file_data": "data:application/pdf;base64,JVBERi0="}
    cases: list[dict[str, Any]] = [
        {"input": [{"type": "function_call_output", "call_id": "nope", "output": "x"}]},
        {"input": [{"role": "user", "content": [pdf]}]},
        {"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "https://x/y.png"}]}]},
        {"input": "hi", "tool_choice": "required"},
    ]
    for body in cases:
        with pytest.raises(InvalidRequestError):
            responses(body)
    invalid: list[dict[str, Any]] = [{"input": []}, {"input": "x", "metadata": {str(i): "v" for i in range(17)}}]
    for body in invalid:
        with pytest.raises(ValidationError):
            ResponseRequest.model_validate({"model": "m", **body})


def test_responses_output_is_a_valid_response() -> None:
    builder = responses({"input": "weather?", "tools": RESPONSE_TOOLS, "metadata": {"k": "v"}})
    response = Response.model_validate(builder.complete(final("Let me check. " + CALL_TEXT)))
    assert response.status == "completed" and response.metadata == {"k": "v"}
    message, call = response.output
    assert message.type == "message" and response.output_text == "Let me check."
    assert call.type == "function_call" and call.name == "get_weather"
    assert json.loads(call.arguments) == {"city": "Paris"}
    assert response.usage is not None and response.usage.total_tokens == 7
    stored = builder.record(builder.final_snapshot(final("x")))
    assert stored.messages[-1].tool_calls[0].name == "get_weather"

    truncated = Response.model_validate(responses({"input": "hi"}).complete(final("abc", "length")))
    assert truncated.status == "incomplete" and truncated.incomplete_details is not None


def stream_events(builder: ResponseBuilder, pieces: list[str], last: FinalEvent | ErrorEvent) -> list[Any]:
    frames = builder.start()
    for event in token_events(pieces):
        frames += builder.on_token(event)
    frames += builder.on_final(last)[0] if isinstance(last, FinalEvent) else builder.on_error(last)
    adapter: TypeAdapter[Any] = TypeAdapter(ResponseStreamEvent)
    events = [adapter.validate_python(data_of(frame)) for frame in frames]
    assert [e.sequence_number for e in events] == list(range(len(events)))
    return events


def test_responses_stream_event_order() -> None:
    builder = responses({"input": "weather?", "tools": RESPONSE_TOOLS})
    events = stream_events(builder, ["\n", "Sure", ". ", "<tool_call>", CALL_TEXT[len("<tool_call>") :]], final(""))
    assert [e.type for e in events] == [
        "response.created", "response.in_progress",
        "response.output_item.added", "response.content_part.added",
        "response.output_text.delta", "response.output_text.delta",
        "response.output_text.done", "response.content_part.done", "response.output_item.done",
        "response.output_item.added", "response.function_call_arguments.delta",
        "response.function_call_arguments.done", "response.output_item.done",
        "response.completed",
    ]  # fmt: skip
    completed = events[-1].response
    assert completed.output_text == "\nSure. " and completed.output[1].name == "get_weather"
    assert events[4].delta == "\nSure"  # held-back leading whitespace is not lost

    failed = stream_events(responses({"input": "hi"}), ["a"], ErrorEvent(message="worker died", status=503))
    assert failed[-1].type == "response.failed" and failed[-1].response.error.message == "worker died"


def test_a_failed_store_ends_the_stream_with_response_failed() -> None:
    class BrokenStore:
        enabled = True

        async def put(self, response_id: str, record: Any) -> None:
            raise redis.ConnectionError("Redis is down")

    builder = responses({"input": "hi"})
    frames = StreamFrames(builder, cast(ResponseStore, BrokenStore()))
    out = builder.start() + list(frames(TokenEvent(text="hello")))
    with pytest.raises(redis.ConnectionError) as failure:
        asyncio.run(frames.on_final(final("hello")))
    out += list(frames(event_from_error(failure.value)))  # what the relay does with the exception
    adapter: TypeAdapter[Any] = TypeAdapter(ResponseStreamEvent)
    events = [adapter.validate_python(data_of(frame)) for frame in out]
    assert [e.sequence_number for e in events] == list(range(len(events)))
    assert events[-1].type == "response.failed" and "Redis" in events[-1].response.error.message
