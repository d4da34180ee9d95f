"""Chat completions, completions, embeddings and models through the `openai` client against a live
stack (real redis-server, `ollm worker` on the real default models, `ollm serve`)."""

from __future__ import annotations

import base64
import concurrent.futures
import json
from typing import Any

import httpx
import jsonschema
import numpy as np
import openai
import pytest

from tests.conftest import CITY_SCHEMA, DEFAULT_CHAT_MODEL, DEFAULT_EMBEDDING_MODEL
from tests.integration.harness import Live

pytestmark = pytest.mark.slow

MODEL = DEFAULT_CHAT_MODEL
FRANCE: Any = [{"role": "user", "content": "What is the capital of France?"}]
WEATHER_TOOL: Any = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Get the current weather in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}
TIME_TOOL: Any = {
    "type": "function",
    "function": {"name": "get_time", "description": "Get the current time", "parameters": {"type": "object"}},
}


def test_plain_and_streamed_chat_agree_with_usage(client: openai.OpenAI) -> None:
    plain = client.chat.completions.create(model=MODEL, messages=FRANCE, max_tokens=16, temperature=0)
    text = plain.choices[0].message.content or ""
    # "Paris" is a semantic anchor that holds on every kernel: the model's answer by a wide margin.
    assert "Paris" in text and plain.choices[0].finish_reason in ("stop", "length")
    assert plain.usage is not None and plain.usage.completion_tokens > 0

    stream = client.chat.completions.create(
        model=MODEL, messages=FRANCE, max_tokens=16, temperature=0, stream=True, stream_options={"include_usage": True}
    )
    chunks = list(stream)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == plain.choices[0].finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage == plain.usage


def test_stop_and_length(client: openai.OpenAI) -> None:
    stopped = client.chat.completions.create(model=MODEL, messages=FRANCE, max_tokens=16, temperature=0, stop=["Paris"])
    assert "Paris" not in (stopped.choices[0].message.content or "")
    assert stopped.choices[0].finish_reason == "stop"
    short = client.chat.completions.create(
        model=MODEL, messages=FRANCE, max_completion_tokens=3, temperature=0, user="someone"
    )
    assert short.choices[0].finish_reason == "length"
    assert short.usage is not None and short.usage.completion_tokens == 3


def test_seeded_sampling_is_reproducible_and_n_gives_choices(client: openai.OpenAI) -> None:
    def ask() -> list[str]:
        answer = client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "Tell me a story."}], max_tokens=6, temperature=1.0,
            seed=1234, n=2,
        )  # fmt: skip
        assert [c.index for c in answer.choices] == [0, 1]
        return [c.message.content or "" for c in answer.choices]

    # The stack's worker runs batch-invariant (conftest): a seed reproduces whatever else is in the batch.
    first, second = ask(), ask()
    assert first == second and all(first)
    # Streamed, both choices arrive interleaved in one stream and reassemble to the same texts.
    stream = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Tell me a story."}], max_tokens=6, temperature=1.0,
        seed=1234, n=2, stream=True, stream_options={"include_usage": True},
    )  # fmt: skip
    chunks = list(stream)
    texts = ["".join(c.choices[0].delta.content or "" for c in chunks if c.choices and c.choices[0].index == i)
             for i in (0, 1)]  # fmt: skip
    assert texts == first
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 12


def test_logprobs(client: openai.OpenAI) -> None:
    answer = client.chat.completions.create(
        model=MODEL, messages=FRANCE, max_tokens=4, temperature=0, logprobs=True, top_logprobs=2
    )
    logprobs = answer.choices[0].logprobs
    assert logprobs is not None and logprobs.content is not None
    assert answer.usage is not None and len(logprobs.content) == answer.usage.completion_tokens
    assert "".join(item.token for item in logprobs.content) == answer.choices[0].message.content
    for item in logprobs.content:
        assert item.logprob <= 0 and len(item.top_logprobs) == 2
        # Greedy: the chosen token is the most likely one.
        assert item.top_logprobs[0].token == item.token


def test_json_schema_output_validates(client: openai.OpenAI) -> None:
    schema = CITY_SCHEMA
    prompts = ["Describe Paris as JSON.", "Describe Tokyo as JSON.", "Give me JSON about Nairobi."]

    def ask(prompt: str) -> str:
        answer = client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": prompt}], max_tokens=80, temperature=0,
            response_format={"type": "json_schema", "json_schema": {"name": "city", "schema": schema, "strict": True}},
        )  # fmt: skip
        assert answer.choices[0].finish_reason == "stop"
        return answer.choices[0].message.content or ""

    with concurrent.futures.ThreadPoolExecutor(len(prompts)) as pool:
        for text in pool.map(ask, prompts):
            jsonschema.validate(json.loads(text), schema)


def test_tool_calls_named_required_streamed_and_round_trip(client: openai.OpenAI) -> None:
    messages: Any = [{"role": "user", "content": "What is the weather like in Paris?"}]
    named: Any = {"type": "function", "function": {"name": "get_weather"}}
    answer = client.chat.completions.create(
        model=MODEL, messages=messages, tools=[TIME_TOOL, WEATHER_TOOL], tool_choice=named, max_tokens=40,
        temperature=0,
    )  # fmt: skip
    assert answer.choices[0].finish_reason == "tool_calls"
    (call,) = answer.choices[0].message.tool_calls or []
    assert call.type == "function" and call.function.name == "get_weather" and call.id
    jsonschema.validate(json.loads(call.function.arguments), WEATHER_TOOL["function"]["parameters"])

    # "required" streamed: the call arrives as deltas (id and name, then arguments), never as content.
    stream = client.chat.completions.create(
        model=MODEL, messages=messages, tools=[WEATHER_TOOL], tool_choice="required", max_tokens=40, temperature=0,
        stream=True,
    )  # fmt: skip
    chunks = list(stream)
    deltas = [tc for c in chunks if c.choices for tc in c.choices[0].delta.tool_calls or []]
    assert deltas[0].id and deltas[0].function is not None and deltas[0].function.name == "get_weather"
    streamed = "".join(d.function.arguments or "" for d in deltas if d.function is not None)
    jsonschema.validate(json.loads(streamed), WEATHER_TOOL["function"]["parameters"])
    assert chunks[-1].choices[0].finish_reason == "tool_calls"
    assert not "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)

    # The round trip: the call and its result go back, and the model answers from the result.
    messages += [
        {"role": "assistant", "content": None, "tool_calls": [call.model_dump(exclude_none=True)]},
        {"role": "tool", "tool_call_id": call.id, "content": "Sunny and 18 degrees Celsius."},
    ]
    final = client.chat.completions.create(
        model=MODEL, messages=messages, tools=[TIME_TOOL, WEATHER_TOOL], tool_choice="none", max_tokens=24,
        temperature=0,
    )  # fmt: skip
    reply = final.choices[0].message
    assert reply.tool_calls is None and reply.content
    # The result is rendered into the prompt: a longer result makes a longer prompt. What the model
    # then says is its own, and differs between CPUs' kernels.
    messages[-1] = {**messages[-1], "content": "Sunny and 18 degrees Celsius, with a light wind from the west."}
    longer = client.chat.completions.create(
        model=MODEL, messages=messages, tools=[TIME_TOOL, WEATHER_TOOL], tool_choice="none", max_tokens=1,
    )  # fmt: skip
    assert final.usage is not None and longer.usage is not None
    assert longer.usage.prompt_tokens > final.usage.prompt_tokens


def test_completions(client: openai.OpenAI) -> None:
    prompt = "The capital of France is"
    plain = client.completions.create(model=MODEL, prompt=prompt, max_tokens=6, temperature=0, seed=1, logprobs=2)
    choice = plain.choices[0]
    assert "Paris" in choice.text and choice.finish_reason in ("stop", "length")
    assert choice.logprobs is not None and "".join(choice.logprobs.tokens or []) == choice.text
    assert all(len(top) == 2 for top in choice.logprobs.top_logprobs or [])

    stream = client.completions.create(
        model=MODEL, prompt=prompt, max_tokens=6, temperature=0, stream=True, stream_options={"include_usage": True}
    )
    chunks = list(stream)
    assert "".join(c.choices[0].text for c in chunks if c.choices) == choice.text
    assert chunks[-1].usage is not None and chunks[-1].usage == plain.usage

    both = client.completions.create(
        model=MODEL, prompt=[prompt, "One, two, three,"], max_tokens=6, temperature=0, echo=True, suffix=" [end]",
        stop=["\n"],
    )  # fmt: skip
    assert [c.index for c in both.choices] == [0, 1]
    assert both.choices[0].text.startswith(prompt) and both.choices[0].text.endswith(" [end]")
    assert both.choices[1].text.startswith("One, two, three,")
    streamed = client.completions.create(
        model=MODEL, prompt=[prompt, "One, two, three,"], max_tokens=6, temperature=0, echo=True, suffix=" [end]",
        stop=["\n"], stream=True,
    )  # fmt: skip
    parts = list(streamed)
    assert ["".join(c.choices[0].text for c in parts if c.choices[0].index == i) for i in (0, 1)] == [
        c.text for c in both.choices
    ]


def test_embeddings_float_base64_and_dimensions(client: openai.OpenAI) -> None:
    texts = ["The cat sat on the mat.", "A feline rested on a rug."]
    floats = client.embeddings.create(model=DEFAULT_EMBEDDING_MODEL, input=texts, encoding_format="float")
    # Without encoding_format the client asks for base64 and decodes it itself.
    decoded = client.embeddings.create(model=DEFAULT_EMBEDDING_MODEL, input=texts)
    raw = client.embeddings.create(model=DEFAULT_EMBEDDING_MODEL, input=texts, encoding_format="base64")
    for a, b, c in zip(floats.data, decoded.data, raw.data, strict=True):
        assert len(a.embedding) == 384
        assert np.allclose(a.embedding, b.embedding, atol=1e-6)
        assert isinstance(c.embedding, str)
        assert np.allclose(np.frombuffer(base64.b64decode(c.embedding), dtype="<f4"), a.embedding, atol=1e-6)
    assert floats.usage.prompt_tokens > 0 and floats.usage.total_tokens == floats.usage.prompt_tokens

    small = client.embeddings.create(model=DEFAULT_EMBEDDING_MODEL, input=texts[0], dimensions=64)
    vector = np.array(small.data[0].embedding)
    assert vector.shape == (64,) and abs(np.linalg.norm(vector) - 1) < 1e-4
    tokens = client.embeddings.create(model=DEFAULT_EMBEDDING_MODEL, input=[[101, 7592, 102]], encoding_format="float")
    assert len(tokens.data[0].embedding) == 384


def test_models(client: openai.OpenAI) -> None:
    # Every model a request may name: served by a worker, or pulled here and loaded on first use.
    ids = [model.id for model in client.models.list()]
    assert ids == sorted(ids) and {MODEL, DEFAULT_EMBEDDING_MODEL, "echo"} <= set(ids)
    model = client.models.retrieve(MODEL)
    assert model.id == MODEL and model.object == "model" and model.owned_by == "ollm"
    with pytest.raises(openai.NotFoundError) as missing:
        client.models.retrieve("no-such-model")
    assert "no-such-model" in str(missing.value)


IMAGE = (
    "data:image/png;base64,"
    "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mP8z8BQDwAEhQGAhKmMIQAAAABJRU5ErkJggg=="
)
IMAGE_MESSAGE = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": IMAGE}}]}]
IMAGE_PART = {"type": "input_image", "image_url": IMAGE}
PDF_PART = {"type": "input_file", "filename": "a.pdf", "file_data": "data:application/pdf;base64,JVBERi0xLjQ="}


@pytest.mark.parametrize(
    ("method", "path", "body", "status", "param"),
    [
        ("POST", "/v1/chat/completions", {"model": MODEL}, 422, "messages"),
        ("POST", "/v1/chat/completions", {"model": MODEL, "messages": "hi"}, 422, "messages"),
        ("POST", "/v1/chat/completions", {"model": MODEL, "messages": FRANCE, "temperature": 5}, 422, "temperature"),
        ("POST", "/v1/chat/completions", {"model": MODEL, "messages": FRANCE, "n": 1000}, 422, "n"),
        ("POST", "/v1/chat/completions", {"model": MODEL, "messages": FRANCE, "tool_choice": "required"}, 400,
         "tool_choice"),
        ("POST", "/v1/chat/completions", {"model": MODEL, "messages": IMAGE_MESSAGE}, 400, None),
        ("POST", "/v1/completions", {"model": MODEL}, 422, "prompt"),
        ("POST", "/v1/completions", {"model": MODEL, "prompt": [[1, 2, 3]]}, 400, "prompt"),
        ("POST", "/v1/completions", {"model": MODEL, "prompt": "x", "max_tokens": -1}, 422, "max_tokens"),
        ("POST", "/v1/embeddings", {"input": []}, 400, "input"),
        # Checked by the worker, which knows the model's size.
        ("POST", "/v1/embeddings", {"input": "x", "dimensions": 100000}, 400, None),
        ("POST", "/v1/embeddings", {"input": "x", "encoding_format": "hex"}, 422, "encoding_format"),
        ("GET", "/v1/models/no-such-model", None, 404, None),
        ("POST", "/v1/responses", {"model": MODEL}, 422, "input"),
        ("POST", "/v1/responses", {"model": MODEL, "input": "hi", "previous_response_id": "resp_nope"}, 400,
         "previous_response_id"),
        ("POST", "/v1/responses", {"model": MODEL, "input": "hi", "max_output_tokens": 0}, 422, "max_output_tokens"),
        ("POST", "/v1/responses", {"model": MODEL, "input": [{"role": "user", "content": [IMAGE_PART]}]}, 400, None),
        ("POST", "/v1/responses", {"model": MODEL, "input": [{"role": "user", "content": [PDF_PART]}]}, 400,
         "input.0.content.0"),
        ("GET", "/v1/responses/resp_nope", None, 404, None),
        ("DELETE", "/v1/responses/resp_nope", None, 404, None),
        ("GET", "/v1/responses/resp_nope/input_items", None, 404, None),
    ],
)  # fmt: skip
def test_bad_input_gets_a_4xx_openai_error(
    live: Live, method: str, path: str, body: dict[str, Any] | None, status: int, param: str | None
) -> None:
    answer = httpx.request(method, f"{live.server.url}{path}", json=body, timeout=60)
    assert answer.status_code == status, answer.text
    error = answer.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["type"] == "invalid_request_error"
    assert error["message"]
    if param is not None:
        assert error["param"] == param
    if "image_url" in json.dumps(body) or "input_image" in json.dumps(body):
        assert MODEL in error["message"]  # a text-only model is named


def test_bad_json_and_unserved_model(live: Live, client: openai.OpenAI) -> None:
    headers = {"Content-Type": "application/json"}
    answer = httpx.post(f"{live.server.url}/v1/chat/completions", content=b"{not json", headers=headers, timeout=30)
    assert answer.status_code == 400 and answer.json()["error"]["code"] == "invalid_json"
    # A real model nobody serves is the server's state: 503 naming the model, at once. A name that
    # is no model at all is the client's mistake: 404 in OpenAI's shape.
    with pytest.raises(openai.APIStatusError) as unserved:
        client.chat.completions.create(model="llama3-1B-chat", messages=FRANCE)
    assert unserved.value.status_code == 503 and "llama3-1B-chat" in str(unserved.value)
    with pytest.raises(openai.NotFoundError) as unknown:
        client.chat.completions.create(model="nobody-has-this-model", messages=FRANCE)
    assert unknown.value.body["code"] == "model_not_found"  # type: ignore[index]
