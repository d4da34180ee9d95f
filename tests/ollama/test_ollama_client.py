"""The Ollama API as Ollama's own tools meet it: the official `ollama` client (and raw HTTP for the
byte-level framing) against a live redis-server + `ollm worker` (real default models) + `ollm serve`.

Generations are greedy and a few tokens long: the point is the wire format, and the machine may
be busy with other suites.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import jsonschema
import ollama
import pytest

from tests.conftest import DEFAULT_CHAT_MODEL, DEFAULT_EMBEDDING_MODEL
from tests.integration.harness import Server, Worker, new_namespace, stop_all, wait_until
from tests.ollama.conftest import OllamaStack
from workers.redis_server import RedisServer

pytestmark = pytest.mark.slow

MODEL = DEFAULT_CHAT_MODEL
GREEDY: dict[str, Any] = {"temperature": 0, "num_predict": 8}
TIMINGS = (
    "total_duration",
    "load_duration",
    "prompt_eval_count",
    "prompt_eval_duration",
    "eval_count",
    "eval_duration",
)
WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Get the weather in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}


def test_root_and_version(stack: OllamaStack) -> None:
    assert httpx.get(stack.url + "/").text == "Ollama is running"
    assert httpx.head(stack.url + "/").status_code == 200
    assert httpx.get(stack.url + "/api/version").json()["version"]


def test_generate_whole_and_streamed(stack: OllamaStack) -> None:
    client = stack.client()
    whole = client.generate(model=MODEL, prompt="What is the capital of France?", options=GREEDY)
    # "Paris" is the semantic anchor kept: the model's answer by a wide margin on every kernel.
    assert "Paris" in (whole.response or "")
    assert whole.done is True and whole.done_reason in ("stop", "length")
    assert whole.prompt_eval_count and whole.eval_count and whole.total_duration and whole.eval_duration

    parts = list(client.generate(model=MODEL, prompt="What is the capital of France?", options=GREEDY, stream=True))
    assert [p.done for p in parts] == [False] * (len(parts) - 1) + [True]
    # Greedy, so the stream spells out the same text; the final object carries only statistics.
    assert "".join(p.response or "" for p in parts) == whole.response
    assert parts[-1].response == "" and parts[-1].eval_count == whole.eval_count


def test_chat_whole_and_streamed_with_the_latest_tag(stack: OllamaStack) -> None:
    client = stack.client()
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    whole = client.chat(model=f"{MODEL}:latest", messages=messages, options=GREEDY)
    assert whole.model == f"{MODEL}:latest"
    assert whole.message.role == "assistant" and "Paris" in (whole.message.content or "")
    parts = list(client.chat(model=MODEL, messages=messages, options=GREEDY, stream=True))
    assert parts[-1].done is True and parts[-1].done_reason in ("stop", "length")
    assert "".join(p.message.content or "" for p in parts) == whole.message.content


def _ndjson_lines(response: httpx.Response) -> list[dict[str, Any]]:
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("application/x-ndjson")
    body = response.read()
    assert body.endswith(b"\n")
    lines = body.split(b"\n")[:-1]
    # One compact JSON object per line, nothing else: no blank lines, no SSE prefixes.
    objects = [json.loads(line) for line in lines]
    assert all(line and isinstance(obj, dict) for line, obj in zip(lines, objects, strict=True))
    return objects


@pytest.mark.parametrize(
    ("path", "payload"),
    [
        ("/api/generate", {"prompt": "Name a colour."}),
        ("/api/chat", {"messages": [{"role": "user", "content": "Name a colour."}]}),
    ],
)
def test_ndjson_framing_byte_level(stack: OllamaStack, path: str, payload: dict[str, Any]) -> None:
    # Like `curl -d`, which Ollama's docs use: no JSON content type, streaming by default.
    body = json.dumps({"model": MODEL, "options": {"temperature": 0, "num_predict": 4}, **payload})
    with httpx.Client(base_url=stack.url, timeout=120) as http:
        response = http.post(path, content=body, headers={"content-type": "application/x-www-form-urlencoded"})
    objects = _ndjson_lines(response)
    assert len(objects) >= 2
    assert all(obj["done"] is False and obj["model"] == MODEL for obj in objects[:-1])
    final = objects[-1]
    assert final["done"] is True and final["done_reason"] == "length"
    for key in TIMINGS:
        assert isinstance(final[key], int) and final[key] >= 0, key
    assert final["eval_count"] == 4 and final["total_duration"] >= final["eval_duration"] > 0
    datetime.fromisoformat(final["created_at"])


def test_structured_output_follows_the_schema(stack: OllamaStack) -> None:
    schema = {
        "type": "object",
        "properties": {"answer": {"type": "boolean"}, "colour": {"type": "string", "enum": ["blue", "red", "green"]}},
        "required": ["answer", "colour"],
    }
    response = stack.client().chat(
        model=MODEL,
        messages=[{"role": "user", "content": "Is the sky blue? Reply in JSON."}],
        format=schema,
        options={"temperature": 0, "num_predict": 40},
    )
    jsonschema.validate(json.loads(response.message.content or ""), schema)


def test_tool_call_comes_back_with_object_arguments(stack: OllamaStack) -> None:
    # One earlier call in the history shows the 135M model the call format it should follow. The
    # streamed form (calls split out of the token stream) is tested in test_translation, without a model.
    earlier_call = {"function": {"name": "get_weather", "arguments": {"city": "Paris"}}}
    messages: list[dict[str, Any]] = [
        {"role": "user", "content": "What is the weather in Paris?"},
        {"role": "assistant", "content": "", "tool_calls": [earlier_call]},
        {"role": "user", "content": "What is the weather in Tokyo?"},
    ]
    client = stack.client()
    # No repeat penalty: the default one (1.1 over the last 64 tokens, as Ollama's) counts the
    # prompt's tokens, and on a 135M model it steers the name away from the earlier call's.
    options = {"temperature": 0, "num_predict": 40, "repeat_penalty": 1.0}
    response = client.chat(model=MODEL, messages=messages, tools=[WEATHER_TOOL], options=options)
    # That the model calls the tool is the anchor: the earlier call of the same shape makes it the
    # likely answer on any kernel. Which city it names is the model's business, not the API's.
    assert response.message.tool_calls, response.message.content
    call = response.message.tool_calls[0].function
    assert call.name == "get_weather" and isinstance(call.arguments, dict)
    jsonschema.validate(call.arguments, WEATHER_TOOL["function"]["parameters"])
    assert "<tool_call>" not in (response.message.content or "")


def test_embed_and_legacy_embeddings(stack: OllamaStack) -> None:
    client = stack.client()
    response = client.embed(model=DEFAULT_EMBEDDING_MODEL, input=["the sky is blue", "grass is green"])
    assert len(response.embeddings) == 2 and all(len(v) == 384 for v in response.embeddings)
    assert response.prompt_eval_count and response.prompt_eval_count > 0
    assert len(client.embed(model=DEFAULT_EMBEDDING_MODEL, input="one", dimensions=64).embeddings[0]) == 64
    legacy = client.embeddings(model=DEFAULT_EMBEDDING_MODEL, prompt="the sky is blue")
    assert legacy.embedding == pytest.approx(response.embeddings[0], abs=1e-5)


def test_list_and_show(stack: OllamaStack) -> None:
    client = stack.client()
    listed = {m.model: m for m in client.list().models}
    model = listed[f"{MODEL}:latest"]
    assert model.size and model.size > 100_000_000 and model.digest and len(model.digest) == 64
    assert model.details is not None and model.details.family == "llama" and model.modified_at is not None
    assert f"{DEFAULT_EMBEDDING_MODEL}:latest" in listed

    shown = client.show(MODEL)
    assert shown.details is not None and shown.details.family == "llama"
    assert shown.modelinfo is not None and shown.modelinfo["general.architecture"] == "llama"
    assert shown.modelinfo["llama.context_length"] == 8192
    assert shown.capabilities is not None and {"completion", "tools"} <= set(shown.capabilities)
    assert shown.template and "im_start" in shown.template
    assert "embedding" in (client.show(DEFAULT_EMBEDDING_MODEL).capabilities or [])


def test_pull_streams_progress(stack: OllamaStack) -> None:
    client = stack.client()
    events = list(client.pull(MODEL, stream=True))
    assert events[0].status == "pulling manifest" and events[-1].status == "success"
    assert client.pull(MODEL).status == "success"
    with pytest.raises(ollama.ResponseError) as missing:
        client.pull("no-such-model-anywhere")
    assert missing.value.status_code == 404


def test_create_then_chat_copy_and_delete(stack: OllamaStack) -> None:
    client = stack.client()
    system = "You are Captain Zorblax, a pirate. Answer in one short sentence."
    created = list(
        client.create(model="zorblax", from_=MODEL, system=system, parameters={"temperature": 0, "num_predict": 8},
                      stream=True)
    )  # fmt: skip
    assert created[-1].status == "success"
    question = [{"role": "user", "content": "Who are you?"}]
    derived = client.chat(model="zorblax", messages=question)
    # The created model is the base model with its system prompt and parameters: same prompt
    # tokens, same greedy answer as asking the base model with that system message.
    direct = client.chat(model=MODEL, messages=[{"role": "system", "content": system}, *question], options=GREEDY)
    assert derived.message.content == direct.message.content
    assert derived.prompt_eval_count == direct.prompt_eval_count
    plain = client.chat(model=MODEL, messages=question, options=GREEDY)
    assert plain.prompt_eval_count != derived.prompt_eval_count

    shown = client.show("zorblax")
    assert shown.details is not None and shown.details.parent_model == f"{MODEL}:latest"
    assert shown.parameters is not None and "num_predict" in shown.parameters and "Zorblax" in (shown.modelfile or "")

    assert client.copy("zorblax", "zorblax-copy").status == "success"
    names = {m.model for m in client.list().models}
    assert {"zorblax:latest", "zorblax-copy:latest"} <= names
    again = client.chat(model="zorblax-copy:latest", messages=question)
    assert again.message.content == derived.message.content

    assert client.delete("zorblax-copy").status == "success"
    assert "zorblax-copy:latest" not in {m.model for m in client.list().models}
    with pytest.raises(ollama.ResponseError) as gone:
        client.delete("zorblax-copy")
    assert gone.value.status_code == 404
    client.delete("zorblax")


def test_errors_in_ollamas_shape(stack: OllamaStack) -> None:
    with httpx.Client(base_url=stack.url, timeout=60) as http:
        missing = http.post("/api/chat", json={"model": "llama3.2", "messages": [{"role": "user", "content": "hi"}]})
        assert missing.status_code == 404
        assert missing.json() == {"error": 'model "llama3.2" not found, try pulling it first'}
        bad_format = http.post("/api/generate", json={"model": MODEL, "prompt": "x", "format": "xml"})
        assert bad_format.status_code == 400 and "format" in bad_format.json()["error"]
        no_model = http.post("/api/generate", json={"prompt": "x"})
        assert no_model.status_code == 400 and set(no_model.json()) == {"error"}
        not_json = http.post("/api/chat", content=b"{not json")
        assert not_json.status_code == 400 and "JSON" in not_json.json()["error"]
        wrong_kind = http.post("/api/generate", json={"model": DEFAULT_EMBEDDING_MODEL, "prompt": "x"})
        assert wrong_kind.status_code == 400 and "does not support generate" in wrong_kind.json()["error"]
        not_an_embedder = http.post("/api/embed", json={"model": MODEL, "input": "x"})
        assert not_an_embedder.status_code == 400 and "does not support embed" in not_an_embedder.json()["error"]
        pushed = http.post("/api/push", json={"model": MODEL})
        assert pushed.status_code == 501 and "registry" in pushed.json()["error"]
        # /v1 keeps OpenAI's error shape.
        openai_style = http.post("/v1/chat/completions", json={"model": MODEL})
        assert isinstance(openai_style.json()["error"], dict)
    with pytest.raises(ollama.ResponseError) as raised:
        stack.client().generate(model="llama3.2", prompt="hi")
    assert raised.value.status_code == 404 and "try pulling it first" in raised.value.error


def _rss_mib(pid: int) -> int:
    with open(f"/proc/{pid}/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") // 2**20


def _running(client: ollama.Client) -> dict[str, ollama.ProcessResponse.Model]:
    return {m.model or "": m for m in client.ps().models}


@pytest.fixture
def own_stack(
    tmp_path: Path, redis_server: RedisServer, default_model_dir: Path, embedding_model_dir: Path
) -> Iterator[OllamaStack]:
    """A stack of its own: the test unloads the model and sets keep-alives, which the shared one
    must not see. The worker is the one Ollama users run: both default models, default modes."""
    ns = new_namespace()
    worker = Worker(redis_server.url, ns, [MODEL, DEFAULT_EMBEDDING_MODEL], tmp_path / "worker.log")
    server = Server(redis_server.url, ns, tmp_path / "server.log")
    try:
        worker.wait_ready(timeout=300)
        yield OllamaStack(server.wait_ready(), worker, ns, redis_server.url)
    finally:
        stop_all([server, worker])


def test_ps_and_keep_alive(own_stack: OllamaStack) -> None:
    stack = own_stack
    client = stack.client()
    client.generate(model=MODEL, prompt="Hi", options={"num_predict": 1}, keep_alive="10m")

    def expires_in_ten_minutes() -> bool:
        # Workers refresh their report every half second: the new keep-alive shows up within that.
        expires = _running(client)[f"{MODEL}:latest"].expires_at
        return expires is not None and timedelta(minutes=9) < expires - datetime.now(UTC) <= timedelta(minutes=10)

    wait_until(expires_in_ten_minutes, 10, "/api/ps to show the 10m keep-alive")
    assert (_running(client)[f"{MODEL}:latest"].size or 0) > 100_000_000

    before = _rss_mib(stack.worker.pid)
    unloaded = client.generate(model=MODEL, keep_alive=0)
    assert unloaded.done_reason == "unload"
    assert f"{MODEL}:latest" not in _running(client)
    # Out of memory, not just out of the list: the worker gives back most of the ~270 MB of weights.
    assert before - _rss_mib(stack.worker.pid) > 100

    # An empty prompt loads it again; -1 keeps it forever (Ollama shows a far-future expiry).
    assert client.chat(model=MODEL, messages=[], keep_alive=-1).done_reason == "load"
    forever = _running(client)[f"{MODEL}:latest"].expires_at
    assert forever is not None and forever.year > 2200

    # Idle past a short keep-alive: unloaded by the worker on its own, reloaded by the next request.
    client.generate(model=MODEL, prompt="Hi", options={"num_predict": 1}, keep_alive="1s")
    wait_until(lambda: f"{MODEL}:latest" not in _running(client), 15, "the model to be unloaded after 1s idle")
    started = time.monotonic()
    again = client.generate(model=MODEL, prompt="Hi", options={"num_predict": 1})
    assert again.load_duration and again.load_duration > 0 and time.monotonic() - started < 60
    wait_until(lambda: f"{MODEL}:latest" in _running(client), 5, "/api/ps to list the reloaded model")
