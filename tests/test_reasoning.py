"""The output split, once for every API family: harmony channels, <think> tags, <tool_call> markup.

Parsers are fed recorded outputs piece by piece (as the engine feeds them, harmony's markers as
special tokens) and whole; the split must be the same either way, and no marker ever reaches the
content.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime

import pytest

from ollm import harmony
from ollm.generation import ChatMessage, GenerationRequest, ToolCall
from ollm.reasoning import OutputParser, OutputSplitter, Split, TaggedParser
from ollm.tools import ToolCallParser, read_partial_object

_MARKER = re.compile("(" + "|".join(re.escape(m) for m in harmony.MARKERS) + ")")
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Weather for a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "description": "City name"}, "days": {"type": "integer"}},
            "required": ["city"],
        },
    },
}


def _pieces(output: str, size: int) -> list[tuple[str, bool]]:
    """Output as the engine feeds it: markers whole (special tokens), text in ``size``-char tokens."""
    out: list[tuple[str, bool]] = []
    for part in _MARKER.split(output):
        if part in harmony.MARKERS:
            out.append((part, True))
        else:
            out += [(part[i : i + size], False) for i in range(0, len(part), size)]
    return out


def _run(parser: OutputParser, pieces: list[tuple[str, bool]]) -> tuple[Split, list[Split]]:
    splitter = OutputSplitter(parser)
    steps = [splitter.feed(text, special) for text, special in pieces] + [splitter.finish()]
    return splitter.total, steps


def _same_streamed_and_whole(make: type[OutputParser] | object, output: str) -> tuple[Split, list[Split]]:
    assert callable(make)
    whole, _ = _run(make(), _pieces(output, 10_000))
    streamed, steps = _run(make(), _pieces(output, 3))
    assert (streamed.reasoning, streamed.content) == (whole.reasoning, whole.content)
    assert [(c.name, c.arguments, c.partial_arguments) for c in streamed.calls] == [
        (c.name, c.arguments, c.partial_arguments) for c in whole.calls
    ]
    for split in [whole, streamed]:
        assert "<|" not in split.content + split.reasoning
    return streamed, steps


def test_harmony_reasoning_then_final() -> None:
    output = (
        "<|channel|>analysis<|message|>User asks capital. Easy.<|end|>"
        "<|start|>assistant<|channel|>final<|message|>Paris.<|return|>"
    )
    split, steps = _same_streamed_and_whole(harmony.HarmonyParser, output)
    assert (split.reasoning, split.content, split.calls) == ("User asks capital. Easy.", "Paris.", [])
    # Streamed as it goes: the first reasoning arrives long before the output ends.
    first = next(i for i, step in enumerate(steps) if step.reasoning)
    assert first < len(steps) // 3


def test_harmony_reasoning_then_tool_call() -> None:
    output = (
        "<|channel|>analysis<|message|>Need weather.<|end|><|start|>assistant<|channel|>commentary "
        'to=functions.get_weather <|constrain|>json<|message|>{"city": "Paris"}<|call|>'
    )
    split, _ = _same_streamed_and_whole(harmony.HarmonyParser, output)
    assert split.reasoning == "Need weather." and split.content == ""
    assert [(c.name, c.arguments, c.partial_arguments) for c in split.calls] == [
        ("get_weather", {"city": "Paris"}, None)
    ]


def test_harmony_recipient_in_the_role_header_and_preamble_as_content() -> None:
    output = (
        "<|channel|>commentary<|message|>Checking.<|end|>"
        '<|start|>assistant to=functions.get_weather<|channel|>commentary json<|message|>{"city": "Oslo"}<|call|>'
    )
    split, _ = _same_streamed_and_whole(harmony.HarmonyParser, output)
    assert split.content == "Checking." and split.calls[0].name == "get_weather"


def test_harmony_truncated_mid_channel_keeps_each_part_in_its_place() -> None:
    split, _ = _same_streamed_and_whole(harmony.HarmonyParser, "<|channel|>analysis<|message|>Let me thi")
    assert (split.reasoning, split.content) == ("Let me thi", "")
    cut = '<|channel|>commentary to=functions.get_weather <|constrain|>json<|message|>{"city": "Par'
    split, _ = _same_streamed_and_whole(harmony.HarmonyParser, cut)
    call = split.calls[0]
    assert (call.name, call.arguments, call.partial_arguments) == ("get_weather", {"city": "Par"}, '{"city": "Par')
    # Cut inside the header: nothing is content, nothing leaks.
    split, _ = _same_streamed_and_whole(harmony.HarmonyParser, "<|channel|>fin")
    assert split == Split()
    # A message without a channel is answer content; its header is not.
    split, _ = _same_streamed_and_whole(harmony.HarmonyParser, "<|end|><|start|>assistant<|message|>Hi")
    assert (split.reasoning, split.content) == ("", "Hi")


def test_harmony_bare_answer_without_channels_is_content() -> None:
    split, _ = _same_streamed_and_whole(harmony.HarmonyParser, "The capital of France is Paris.\nIt is.")
    assert split.content == "The capital of France is Paris.\nIt is." and split.reasoning == ""


def test_harmony_forced_call_header_in_the_prompt() -> None:
    parser = harmony.HarmonyParser(header=harmony.forced_call_header(["get_weather"]))
    split, _ = _run(parser, [('{"city": ', False), ('"Rome"}', False)])
    assert [(c.name, c.arguments) for c in split.calls] == [("get_weather", {"city": "Rome"})]
    # A forced choice among several tools: a <tool_call> in a commentary message.
    several = harmony.HarmonyParser(header=harmony.forced_call_header(["get_weather", "add"]), tools=True)
    split, _ = _run(several, [('<tool_call>\n{"name": "add", "argu', False), ('ments": {"a": 1}}', False)])
    assert split.content == "" and [(c.name, c.arguments) for c in split.calls] == [("add", {"a": 1})]


def test_think_tags_split_streamed_and_whole() -> None:
    def make() -> TaggedParser:
        return TaggedParser(thinking=True, tools=True)

    output = (
        "<think>\nHmm, weather.\n</think>\n\nSure."
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Nice"}}\n</tool_call>'
    )
    split, _ = _same_streamed_and_whole(make, output)
    assert split.reasoning == "\nHmm, weather.\n" and split.content == "Sure."
    assert split.calls[0].arguments == {"city": "Nice"}
    # A template that opened <think> in the prompt: the answer starts inside the reasoning.
    opened, _ = _run(TaggedParser(thinking=True, tools=False, in_reasoning=True), [("a</th", False), ("ink>b", False)])
    assert (opened.reasoning, opened.content) == ("a", "b")


def test_truncated_forced_tool_call_is_a_partial_call_not_markup() -> None:
    parser = ToolCallParser()
    assert parser.feed('<tool_call>\n{"name": "get_') == ("", [])
    content, calls = parser.finish()
    assert content == "" and calls[0].name == "get_" and calls[0].partial_arguments == ""
    parser = ToolCallParser()
    parser.feed('<tool_call>\n{"name": "get_weather", "arguments": {"city": "Lyo')
    _, calls = parser.finish()
    assert (calls[0].name, calls[0].arguments, calls[0].partial_arguments) == (
        "get_weather", {"city": "Lyo"}, '{"city": "Lyo',
    )  # fmt: skip


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ('{"a": 1, "b": "x\\"', {"a": 1, "b": 'x"'}),
        ('{"a": [1, 2', {"a": [1, 2]}),
        ('{"a": 1, "b', {"a": 1}),
        ('{"a": 1, "b": ', {"a": 1}),
        ("", {}),
    ],
)
def test_partial_json_reads_what_was_written(text: str, expected: dict[str, object]) -> None:
    assert read_partial_object(text) == expected


def test_harmony_render_follows_the_documented_layout() -> None:
    request = GenerationRequest(
        model="gpt-oss",
        think="high",
        tools=[WEATHER],
        messages=[
            ChatMessage(role="system", content="Be brief."),
            ChatMessage(role="user", content="Hi"),
            ChatMessage(role="assistant", content="Hello!", reasoning="old thought"),
            ChatMessage(role="user", content="Weather in Paris?"),
            ChatMessage(
                role="assistant",
                reasoning="need tool",
                tool_calls=[ToolCall(id="c1", name="get_weather", arguments={"city": "Paris"})],
            ),
            ChatMessage(role="tool", content='{"sunny": true}', tool_call_id="c1"),
        ],
    )
    text = harmony.render(request, today=datetime(2026, 1, 2, tzinfo=UTC))
    assert text.startswith("<|start|>system<|message|>You are ChatGPT")
    assert "Current date: 2026-01-02\n\nReasoning: high\n\n# Valid channels: analysis, commentary, final." in text
    assert (
        "<|start|>developer<|message|># Instructions\n\nBe brief.\n\n# Tools\n\n## functions\n\nnamespace functions {"
    ) in text
    assert (
        "// Weather for a city\ntype get_weather = (_: {\n// City name\ncity: string,\ndays?: number,\n}) => any;"
    ) in text
    assert "<|start|>user<|message|>Hi<|end|><|start|>assistant<|channel|>final<|message|>Hello!<|end|>" in text
    # The finished turn's analysis is dropped; the turn still answering its tool call keeps its own.
    assert "old thought" not in text
    assert "<|start|>assistant<|channel|>analysis<|message|>need tool<|end|>" in text
    assert (
        "<|start|>assistant<|channel|>commentary to=functions.get_weather <|constrain|>json<|message|>"
        '{"city": "Paris"}<|call|>'
        '<|start|>functions.get_weather to=assistant<|channel|>commentary<|message|>{"sunny": true}<|end|>'
    ) in text
    assert text.endswith("<|start|>assistant")
    assert harmony.effort_of(None) == "medium" and harmony.effort_of(False) == "low"
