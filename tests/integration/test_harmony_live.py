"""gpt-oss's harmony answers through every API family, with the official clients against a live
`ollm serve` + `ollm worker` + redis-server.

The model is a tiny random gpt-oss checkpoint (tests/tiny_gpt_oss.py) whose output the worker is
told to steer (OLLM_TEST_STEERING) to known harmony sequences: reasoning then an answer, or
reasoning then a tool call. Each client must get the reasoning apart from the content, streamed and
not, the call as a call, and a call cut by max tokens as a partial call with a "length" finish.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anthropic
import httpx
import ollama
import openai
import pytest
from transformers import AutoTokenizer

from tests import tiny_gpt_oss
from tests.integration.harness import Server, Worker, new_namespace
from workers.redis_server import RedisServer

pytestmark = pytest.mark.slow

MODEL = "test/tiny-gpt-oss"
ASK = [{"role": "user", "content": f"What is the {tiny_gpt_oss.ANSWER}?"}]
ASK_CALL = [{"role": "user", "content": f"What is the {tiny_gpt_oss.CALL}?"}]
ANSWER = "Paris is the capital."
WEATHER: Any = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Weather for a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}


class Stack:
    def __init__(self, server: Server, cut: int) -> None:
        self.server = server
        # max tokens that end the steered call inside its arguments ({"city": "Par).
        self.cut = cut

    def openai(self) -> openai.OpenAI:
        return self.server.openai_client()

    def ollama(self) -> ollama.Client:
        return ollama.Client(host=self.server.url, timeout=120)

    def anthropic(self) -> anthropic.Anthropic:
        return anthropic.Anthropic(base_url=self.server.url, api_key="unused", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def stack(
    tmp_path_factory: pytest.TempPathFactory, redis_server: RedisServer, default_model_dir: Path
) -> Iterator[Stack]:
    root = tmp_path_factory.mktemp("harmony-live")
    model_dir = tiny_gpt_oss.build(root / "models" / MODEL.replace("/", "--"), default_model_dir)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    ids = tokenizer.encode(tiny_gpt_oss.STEERED[tiny_gpt_oss.CALL], add_special_tokens=False)
    # The longest output that has begun the arguments but not finished "Paris".
    cut = max(n for n in range(len(ids)) if '"Paris"' not in (text := tokenizer.decode(ids[:n])) and '{"city"' in text)
    env = {"OLLM_RUNTIME__MODELS_DIR": str(root / "models")}
    namespace = new_namespace()
    server = Server(redis_server.url, namespace, root / "server.log", **env)
    worker = Worker(redis_server.url, namespace, [MODEL], root / "worker.log", **env, **tiny_gpt_oss.steering_env(root))
    try:
        # Both start at once; a loaded machine can take minutes to import torch in each.
        server.wait_ready(timeout=300)
        worker.wait_ready(timeout=300)
        yield Stack(server, cut)
    finally:
        server.stop()
        worker.stop()


def test_openai_chat_reasoning_apart_whole_and_streamed(stack: Stack) -> None:
    client = stack.openai()
    whole = client.chat.completions.create(model=MODEL, messages=ASK, max_tokens=64, reasoning_effort="high")
    message = whole.choices[0].message
    assert message.content == ANSWER and message.reasoning == tiny_gpt_oss.REASONING  # type: ignore[attr-defined]
    assert whole.choices[0].finish_reason == "stop"
    chunks = list(client.chat.completions.create(model=MODEL, messages=ASK, max_tokens=64, stream=True))
    deltas = [chunk.choices[0].delta for chunk in chunks if chunk.choices]
    assert "".join(getattr(d, "reasoning", None) or "" for d in deltas) == tiny_gpt_oss.REASONING
    assert "".join(d.content or "" for d in deltas) == ANSWER
    # Streamed as it goes: reasoning deltas come one by one, before any content.
    reasoning_at = [i for i, d in enumerate(deltas) if getattr(d, "reasoning", None)]
    content_at = [i for i, d in enumerate(deltas) if d.content]
    assert len(reasoning_at) > 3 and max(reasoning_at) < min(content_at)


def test_openai_chat_tool_call_whole_streamed_and_cut(stack: Stack) -> None:
    client = stack.openai()
    whole = client.chat.completions.create(model=MODEL, messages=ASK_CALL, tools=[WEATHER], max_tokens=64)
    choice = whole.choices[0]
    assert choice.finish_reason == "tool_calls" and not choice.message.content
    assert choice.message.tool_calls is not None
    call = choice.message.tool_calls[0]
    assert call.type == "function" and call.function.name == "get_weather"
    assert json.loads(call.function.arguments) == {"city": "Paris"}
    chunks = list(
        client.chat.completions.create(model=MODEL, messages=ASK_CALL, tools=[WEATHER], max_tokens=64, stream=True)
    )
    deltas = [tc for c in chunks if c.choices for tc in c.choices[0].delta.tool_calls or []]
    assert deltas[0].function is not None and deltas[0].function.name == "get_weather"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "tool_calls"
    assert not "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    cut = client.chat.completions.create(model=MODEL, messages=ASK_CALL, tools=[WEATHER], max_tokens=stack.cut)
    choice = cut.choices[0]
    assert choice.finish_reason == "length" and not choice.message.content
    assert choice.message.tool_calls is not None
    partial = choice.message.tool_calls[0]
    assert partial.function.name == "get_weather" and partial.function.arguments.startswith('{"city"')
    assert partial.function.arguments != '{"city": "Paris"}'


def test_openai_responses_reasoning_items_and_events(stack: Stack) -> None:
    client = stack.openai()
    response = client.responses.create(model=MODEL, input=ASK[0]["content"], reasoning={"effort": "low"})
    reasoning, message = response.output
    assert reasoning.type == "reasoning" and reasoning.content is not None
    assert reasoning.content[0].text == tiny_gpt_oss.REASONING
    assert message.type == "message" and response.output_text == ANSWER
    events = list(client.responses.create(model=MODEL, input=ASK[0]["content"], stream=True))
    kinds = [event.type for event in events]
    deltas = [e.delta for e in events if e.type == "response.reasoning_text.delta"]
    assert "".join(deltas) == tiny_gpt_oss.REASONING
    assert kinds.index("response.reasoning_text.done") < kinds.index("response.output_text.delta")
    # Chained: the stored answer keeps its reasoning; the next turn renders without it (harmony).
    follow = client.responses.create(model=MODEL, input=ASK[0]["content"], previous_response_id=response.id)
    assert follow.output_text == ANSWER
    cut = client.responses.create(model=MODEL, input=ASK_CALL[0]["content"], tools=[
        {"type": "function", "name": "get_weather", "parameters": WEATHER["function"]["parameters"]}
    ], max_output_tokens=stack.cut)  # fmt: skip
    assert cut.status == "incomplete" and [item.type for item in cut.output] == ["reasoning", "function_call"]


def test_ollama_think_whole_streamed_and_tool_call(stack: Stack) -> None:
    client = stack.ollama()
    whole = client.chat(model=MODEL, messages=ASK, think="high", options={"num_predict": 64})
    assert whole.message.thinking == tiny_gpt_oss.REASONING and whole.message.content == ANSWER
    parts = list(client.chat(model=MODEL, messages=ASK, think=True, stream=True, options={"num_predict": 64}))
    assert "".join(p.message.thinking or "" for p in parts) == tiny_gpt_oss.REASONING
    assert "".join(p.message.content or "" for p in parts) == ANSWER
    generated = client.generate(model=MODEL, prompt=ASK[0]["content"], think=True, options={"num_predict": 64})
    assert generated.thinking == tiny_gpt_oss.REASONING and generated.response == ANSWER
    called = client.chat(model=MODEL, messages=ASK_CALL, tools=[WEATHER], options={"num_predict": 64})
    assert called.message.tool_calls is not None
    assert called.message.tool_calls[0].function.name == "get_weather"
    assert called.message.tool_calls[0].function.arguments == {"city": "Paris"}
    cut = client.chat(model=MODEL, messages=ASK_CALL, tools=[WEATHER], options={"num_predict": stack.cut})
    assert cut.done_reason == "length" and not cut.message.content and cut.message.tool_calls is not None
    assert cut.message.tool_calls[0].function.name == "get_weather"
    assert "thinking" in client.show(MODEL).capabilities  # type: ignore[operator]


def test_ollama_think_on_a_model_that_cannot_is_a_400(stack: Stack) -> None:
    response = httpx.post(
        stack.server.url + "/api/chat",
        json={"model": "echo", "messages": ASK, "think": True, "stream": False},
        timeout=60,
    )
    assert response.status_code == 400 and response.json() == {"error": '"echo" does not support thinking'}
    with pytest.raises(ollama.ResponseError, match="does not support thinking"):
        stack.ollama().generate(model="echo", prompt="hi", think="low")


def test_anthropic_thinking_blocks_whole_streamed_and_tool_use(stack: Stack) -> None:
    client = stack.anthropic()
    thinking: Any = {"type": "enabled", "budget_tokens": 1024}
    whole = client.messages.create(model=MODEL, messages=ASK, max_tokens=64, thinking=thinking)
    thought, text = whole.content
    assert thought.type == "thinking" and thought.thinking == tiny_gpt_oss.REASONING
    assert text.type == "text" and text.text == ANSWER
    with client.messages.stream(model=MODEL, messages=ASK, max_tokens=64, thinking=thinking) as stream:
        events = list(stream)
        final = stream.get_final_message()
    thinking_deltas = [
        e.delta.thinking for e in events if e.type == "content_block_delta" and e.delta.type == "thinking_delta"
    ]
    assert len(thinking_deltas) > 3 and "".join(thinking_deltas) == tiny_gpt_oss.REASONING
    assert [block.type for block in final.content] == ["thinking", "text"]
    tools: Any = [{"name": "get_weather", "input_schema": WEATHER["function"]["parameters"]}]
    called = client.messages.create(model=MODEL, messages=ASK_CALL, max_tokens=64, tools=tools)
    assert called.stop_reason == "tool_use"
    use = called.content[-1]
    assert use.type == "tool_use" and use.name == "get_weather" and use.input == {"city": "Paris"}
    cut = client.messages.create(model=MODEL, messages=ASK_CALL, max_tokens=stack.cut, tools=tools)
    assert cut.stop_reason == "max_tokens" and [b.type for b in cut.content] == ["thinking", "tool_use"]
