"""A tool call cut short by max tokens is a partial call with a "length" finish on every API family,
never `<tool_call>` markup in the content (it used to answer `"content": "<tool_call>\\n{\\"name\\":
\\"get_"`, `"tool_calls": null`).

The echo worker writes back the user's text word by word, as a model writing that call would, and
the limit cuts it after the name: each official client then receives a call named get_weather.
"""

from __future__ import annotations

from typing import Any

import anthropic
import ollama
import pytest

from tests.integration.conftest import Stack

pytestmark = pytest.mark.slow

CALL = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
# Echo tokens: "<tool_call>", "\n{"name":", " "get_weather",", " "arguments":", ...
CUT = 4
PARAMETERS = {"type": "object", "properties": {"city": {"type": "string"}}}
TOOL: Any = {"type": "function", "function": {"name": "get_weather", "parameters": PARAMETERS}}


def test_openai_chat_and_responses(echo_stack: Stack) -> None:
    client = echo_stack.server.openai_client()
    messages: Any = [{"role": "user", "content": CALL}]
    for stream in (False, True):
        if stream:
            chunks = list(
                client.chat.completions.create(
                    model="echo", messages=messages, tools=[TOOL], max_tokens=CUT, stream=True
                )
            )
            deltas = [c.choices[0].delta for c in chunks if c.choices]
            calls = [tc for d in deltas for tc in d.tool_calls or []]
            assert calls[0].function is not None and calls[0].function.name == "get_weather"
            assert not "".join(d.content or "" for d in deltas)
            assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
        else:
            choice = client.chat.completions.create(model="echo", messages=messages, tools=[TOOL], max_tokens=CUT)
            choice_ = choice.choices[0]
            assert choice_.finish_reason == "length" and choice_.message.content is None
            assert choice_.message.tool_calls is not None
            assert choice_.message.tool_calls[0].function.name == "get_weather"
    response = client.responses.create(
        model="echo", input=CALL, max_output_tokens=CUT,
        tools=[{"type": "function", "name": "get_weather", "parameters": PARAMETERS}],
    )  # fmt: skip
    assert response.status == "incomplete" and [item.type for item in response.output] == ["function_call"]


def test_ollama(echo_stack: Stack) -> None:
    client = ollama.Client(host=echo_stack.server.url, timeout=60)
    answer = client.chat(
        model="echo", messages=[{"role": "user", "content": CALL}], tools=[TOOL], options={"num_predict": CUT}
    )
    assert answer.done_reason == "length" and not answer.message.content
    assert answer.message.tool_calls is not None and answer.message.tool_calls[0].function.name == "get_weather"


def test_anthropic(echo_stack: Stack) -> None:
    client = anthropic.Anthropic(base_url=echo_stack.server.url, api_key="unused", max_retries=0, timeout=60)
    tools: Any = [{"name": "get_weather", "input_schema": PARAMETERS}]
    message = client.messages.create(
        model="echo", messages=[{"role": "user", "content": CALL}], tools=tools, max_tokens=CUT
    )
    assert message.stop_reason == "max_tokens"
    assert [block.type for block in message.content] == ["tool_use"]
    assert message.content[0].type == "tool_use" and message.content[0].name == "get_weather"
