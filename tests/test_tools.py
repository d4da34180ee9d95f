"""Tool calls: the forced format, parsing whole and streamed, and prompts for tool-less templates."""

from __future__ import annotations

import pytest

from ollm.engine.prompting import template_messages
from ollm.errors import InvalidRequestError
from ollm.generation import ChatMessage, GenerationRequest, ToolCall
from ollm.tools import ToolCallParser, render_tool_call, tool_call_constraint

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Weather for a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}
ADD = {"type": "function", "name": "add", "parameters": {"type": "object", "properties": {"a": {"type": "number"}}}}


def test_named_choice_constrains_to_that_function_only() -> None:
    constraint = tool_call_constraint([WEATHER, ADD], "add")
    assert constraint.json_schema is not None
    assert constraint.json_schema["properties"]["name"] == {"const": "add"}
    assert constraint.prefix == "<tool_call>\n" and constraint.suffix == "\n</tool_call>"


def test_required_allows_any_tool_and_unknown_names_are_refused() -> None:
    constraint = tool_call_constraint([WEATHER, ADD], "required")
    assert constraint.json_schema is not None
    assert [v["properties"]["name"]["const"] for v in constraint.json_schema["anyOf"]] == ["get_weather", "add"]
    with pytest.raises(InvalidRequestError, match="nope"):
        tool_call_constraint([WEATHER], "nope")
    with pytest.raises(InvalidRequestError):
        tool_call_constraint([], "required")


def test_parse_round_trips_rendered_calls_and_keeps_invalid_blocks_as_text() -> None:
    call = ToolCall(name="get_weather", arguments={"city": "Paris"})
    parser = ToolCallParser()
    content, calls = parser.feed("Let me check.\n" + render_tool_call(call))
    assert content == "Let me check.\n" and parser.finish() == ("", [])
    assert [(c.name, c.arguments) for c in calls] == [("get_weather", {"city": "Paris"})]
    text = "<tool_call>not json</tool_call>"
    assert ToolCallParser().feed(text) == (text, [])


def test_streaming_parser_hides_markup_and_emits_calls_when_complete() -> None:
    parser = ToolCallParser()
    pieces = ["Sure <to", 'ol_call>\n{"name": "add", ', '"arguments": {"a": 1}}\n</tool_call>', " done <"]
    outputs = [parser.feed(piece) for piece in pieces]
    assert "".join(content for content, _ in outputs) == "Sure  done "
    assert outputs[2][1][0].arguments == {"a": 1}
    assert parser.finish() == ("<", [])


def test_tool_less_template_gets_tools_calls_and_results_written_into_the_conversation() -> None:
    request = GenerationRequest(
        model="m",
        tools=[WEATHER],
        messages=[
            ChatMessage(role="user", content="Weather in Paris?"),
            ChatMessage(role="assistant", tool_calls=[ToolCall(name="get_weather", arguments={"city": "Paris"})]),
            ChatMessage(role="tool", content="sunny", tool_call_id="call_1"),
        ],
    )
    messages = template_messages(request, "{% for m in messages %}{{ m.content }}{% endfor %}")
    assert messages[0]["role"] == "system" and "get_weather" in messages[0]["content"]
    assert '"city": "Paris"' in messages[2]["content"] and "<tool_call>" in messages[2]["content"]
    assert messages[3] == {"role": "user", "content": "<tool_response>\nsunny\n</tool_response>"}
