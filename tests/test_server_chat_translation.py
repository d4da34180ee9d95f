"""The chat completions translator: pure functions, no server."""

from __future__ import annotations

import json

import pytest
from openai.types.chat import ChatCompletion, ChatCompletionChunk

from ollm.errors import InvalidRequestError
from ollm.generation import ErrorEvent, FinalEvent, GenerationRequest, Timings, TokenEvent, TokenLogprob, Usage
from ollm.settings import GenerationSettings
from server.openai.chat_completion.protocol import ChatCompletionRequest
from server.openai.chat_completion.serving import (
    chunk_frames,
    first_chunk,
    from_chat_request,
    to_chat_completion,
)

DEFAULTS = GenerationSettings(max_new_tokens=99, temperature=0.3)


def parse(body: dict[str, object]) -> GenerationRequest:
    return from_chat_request(ChatCompletionRequest.model_validate(body), DEFAULTS)


def test_defaults_come_from_settings_and_client_values_win() -> None:
    request = parse({"model": "m", "messages": [{"role": "user", "content": "hi"}]})
    assert request.sampling.max_new_tokens == 99 and request.sampling.temperature == 0.3
    request = parse(
        {
            "model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5,
            "max_completion_tokens": 7, "temperature": 0, "stop": "END", "seed": 3,
        }
    )  # fmt: skip
    assert request.sampling.max_new_tokens == 7  # the newer name wins
    assert request.sampling.greedy and request.sampling.stop == ["END"] and request.sampling.seed == 3


def test_messages_parts_and_tool_calls_translate() -> None:
    request = parse(
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
    assert parse({**base, "response_format": {"type": "text"}}).constraint is None
    constraint = parse({**base, "response_format": {"type": "json_object"}}).constraint
    assert constraint is not None and constraint.type == "json_object"
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}}
    json_schema = {"type": "json_schema", "json_schema": {"name": "x", "schema": schema}}
    constraint = parse({**base, "response_format": json_schema}).constraint
    assert constraint is not None and constraint.json_schema == schema
    with pytest.raises(InvalidRequestError):
        parse({**base, "response_format": {"type": "json_schema", "json_schema": {"name": "x"}}})


def test_bad_tool_call_arguments_are_a_client_error() -> None:
    bad = {"id": "c", "type": "function", "function": {"name": "f", "arguments": "{nope"}}
    with pytest.raises(InvalidRequestError, match="not JSON"):
        parse({"model": "m", "messages": [{"role": "assistant", "tool_calls": [bad]}]})


def final(reason: str = "stop") -> FinalEvent:
    return FinalEvent(
        finish_reason=reason, text="hello world", usage=Usage(prompt_tokens=3, completion_tokens=2),
        timings=Timings(),
    )


def test_to_chat_completion_is_a_valid_openai_object() -> None:
    request = parse({"model": "m", "messages": [{"role": "user", "content": "hi"}], "logprobs": True})
    logprobs = [TokenLogprob(token="hello", token_id=1, logprob=-0.5)]
    completion = to_chat_completion(request, final("cancelled"), logprobs, created=1)
    wire = ChatCompletion.model_validate(completion.model_dump(mode="json"))
    assert wire.id == f"chatcmpl-{request.id}" and wire.choices[0].message.content == "hello world"
    assert wire.choices[0].finish_reason == "stop"  # OpenAI has no "cancelled"
    assert wire.usage is not None and wire.usage.total_tokens == 5
    assert wire.choices[0].logprobs is not None and wire.choices[0].logprobs.content is not None
    assert wire.choices[0].logprobs.content[0].logprob == -0.5


def data_of(frame: str) -> dict[str, object]:
    assert frame.startswith("data: ") and frame.endswith("\n\n")
    parsed: dict[str, object] = json.loads(frame[len("data: ") :])
    return parsed


def test_stream_chunks() -> None:
    request = parse({"model": "m", "messages": [{"role": "user", "content": "hi"}]})
    frames = chunk_frames(request, created=1, include_usage=True)
    head = ChatCompletionChunk.model_validate(data_of(first_chunk(request, 1)))
    assert head.choices[0].delta.role == "assistant"
    token = ChatCompletionChunk.model_validate(data_of(list(frames(TokenEvent(text="he")))[0]))
    assert token.choices[0].delta.content == "he" and token.choices[0].finish_reason is None
    finish, usage = [ChatCompletionChunk.model_validate(data_of(f)) for f in frames(final("length"))]
    assert finish.choices[0].finish_reason == "length"
    assert usage.choices == [] and usage.usage is not None and usage.usage.completion_tokens == 2
    (error,) = frames(ErrorEvent(message="boom", status=503, code="worker_lost"))
    assert data_of(error)["error"] == {"message": "boom", "type": "server_error", "param": None, "code": "worker_lost"}
