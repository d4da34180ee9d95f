"""The pure Ollama translators: requests to the internal model, events to Ollama's objects, catalogue
facts to tags/show/ps entries. No server, no Redis."""

from __future__ import annotations

import json
from datetime import UTC, datetime

import pytest
from fastapi.exceptions import RequestValidationError

from ollm.derived import DerivedModel
from ollm.errors import InvalidRequestError
from ollm.generation import FinalEvent, FinishReason, Timings, TokenEvent, TokenLogprob, TopLogprob, Usage
from ollm.settings import GenerationSettings
from server.ollama import catalog
from server.ollama.errors import validation_message
from server.ollama.protocol import ChatRequest, CreateRequest, GenerateRequest
from server.ollama.serving import (
    ChatStream,
    GenerateStream,
    constraint_of,
    display_name,
    keep_alive_seconds,
    model_name,
    ndjson,
    options_of,
    sampling_of,
    to_chat_request,
    to_generate_request,
)
from tests.engine_output import split_final, token_events

DEFAULTS = GenerationSettings()


def final(text: str = "Paris.", reason: FinishReason = "stop") -> FinalEvent:
    return split_final(
        text,
        finish_reason=reason,
        usage=Usage(prompt_tokens=12, completion_tokens=3),
        timings=Timings(load_ms=1.5, prompt_eval_ms=2.0, generation_ms=30.0, total_ms=40.0),
    )


@pytest.mark.parametrize(
    ("value", "seconds"),
    [(None, 300.0), (0, 0.0), ("0", 0.0), (-1, None), ("-1", None), ("-1m", None), (90, 90.0), ("5m", 300.0),
     ("1h30m", 5400.0), ("300ms", 0.3), ("2.5s", 2.5)],
)  # fmt: skip
def test_keep_alive_durations(value: float | str | None, seconds: float | None) -> None:
    if seconds is None:
        assert keep_alive_seconds(value) is None
    else:
        assert keep_alive_seconds(value) == pytest.approx(seconds)


@pytest.mark.parametrize("value", ["soon", "5 minutes", "m5", ""])
def test_bad_keep_alive_is_bad_input(value: str) -> None:
    with pytest.raises(InvalidRequestError, match="keep_alive"):
        keep_alive_seconds(value)


def test_names_drop_and_add_the_default_tag() -> None:
    assert model_name(" smollm2-135m-instruct:latest ") == "smollm2-135m-instruct"
    assert model_name("mario:v2") == "mario:v2"
    assert display_name("smollm2-135m-instruct") == "smollm2-135m-instruct:latest"
    assert display_name("HuggingFaceTB/SmolLM2-135M-Instruct") == "HuggingFaceTB/SmolLM2-135M-Instruct:latest"
    assert display_name("mario:v2") == "mario:v2"


def test_options_map_onto_sampling_and_unknown_ones_are_ignored() -> None:
    options = options_of(
        {"temperature": 0.1, "stop": "User:"},
        {"temperature": 0.0, "top_k": 20, "top_p": 0.9, "min_p": 0.05, "seed": 7, "num_predict": 12,
         "repeat_penalty": 1.2, "presence_penalty": 0.5, "frequency_penalty": 0.25, "num_ctx": 4096, "mirostat": 2},
    )  # fmt: skip
    sampling = sampling_of(options, DEFAULTS)
    assert sampling.temperature == 0.0 and sampling.top_k == 20 and sampling.top_p == 0.9 and sampling.min_p == 0.05
    assert sampling.seed == 7 and sampling.max_new_tokens == 12 and sampling.stop == ["User:"]
    assert sampling.repetition_penalty == 1.2 and sampling.presence_penalty == 0.5
    assert sampling.frequency_penalty == 0.25


def test_unbounded_num_predict_uses_the_configured_budget() -> None:
    assert sampling_of(options_of({"num_predict": -1}), DEFAULTS).max_new_tokens == DEFAULTS.max_new_tokens


def test_bad_option_values_are_bad_input() -> None:
    with pytest.raises(InvalidRequestError, match="options.temperature"):
        options_of({"temperature": "hot"})
    with pytest.raises(InvalidRequestError, match="temperature"):
        sampling_of(options_of({"temperature": 5}), DEFAULTS)


def test_logprobs_requests() -> None:
    sampling = sampling_of(options_of(), DEFAULTS, logprobs=True, top_logprobs=3)
    assert sampling.logprobs and sampling.top_logprobs == 3
    assert not sampling_of(options_of(), DEFAULTS).logprobs


def test_format_becomes_a_constraint() -> None:
    assert constraint_of(None) is None and constraint_of("") is None
    json_object = constraint_of("json")
    assert json_object is not None and json_object.type == "json_object"
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}}}
    constrained = constraint_of(schema)
    assert constrained is not None and constrained.type == "json_schema" and constrained.json_schema == schema
    with pytest.raises(InvalidRequestError, match="format"):
        constraint_of("xml")


def test_generate_renders_system_and_prompt_through_the_template() -> None:
    body = GenerateRequest(model="m", prompt="Hi", system="Be brief.", images=["aGk="], format="json")
    request = to_generate_request(body, "base", None, DEFAULTS)
    assert request.model == "base" and request.prompt is None and request.messages is not None
    assert [m.role for m in request.messages] == ["system", "user"]
    assert request.messages[1].text() == "Hi" and request.messages[1].images() == ["aGk="]
    assert request.constraint is not None and request.constraint.type == "json_object"


def test_raw_generate_is_the_prompt_alone() -> None:
    request = to_generate_request(
        GenerateRequest(model="m", prompt="<s>[INST] x", raw=True, system="no"), "b", None, DEFAULTS
    )
    assert request.prompt == "<s>[INST] x" and request.messages is None


def test_generate_refusals() -> None:
    with pytest.raises(InvalidRequestError, match="does not support insert"):
        to_generate_request(GenerateRequest(model="m", prompt="def f(", suffix="return"), "b", None, DEFAULTS)
    with pytest.raises(InvalidRequestError, match="Go template"):
        to_generate_request(GenerateRequest(model="m", prompt="x", template="{{ .Prompt }}"), "b", None, DEFAULTS)
    with pytest.raises(InvalidRequestError, match="raw"):
        to_generate_request(GenerateRequest(model="m", prompt="x", raw=True, images=["aGk="]), "b", None, DEFAULTS)


def test_a_created_model_supplies_defaults_the_request_can_override() -> None:
    derived = DerivedModel(
        name="pirate", base="base", system="Talk like a pirate.", template="{{ messages[0]['content'] }}",
        parameters={"temperature": 0.3, "num_predict": 5},
        messages=[{"role": "user", "content": "Ahoy?"}, {"role": "assistant", "content": "Arr!"}],
    )  # fmt: skip
    request = to_generate_request(
        GenerateRequest(model="pirate", prompt="Hi", options={"temperature": 0.9}), "base", derived, DEFAULTS
    )
    assert request.messages is not None
    assert [(m.role, m.text()) for m in request.messages] == [
        ("system", "Talk like a pirate."), ("user", "Ahoy?"), ("assistant", "Arr!"), ("user", "Hi"),
    ]  # fmt: skip
    assert request.chat_template == "{{ messages[0]['content'] }}"
    assert request.sampling.temperature == 0.9 and request.sampling.max_new_tokens == 5

    # In a chat, a system message of the request's own replaces the model's.
    messages = [{"role": "system", "content": "Be formal."}, {"role": "user", "content": "Hi"}]
    chat = to_chat_request(
        ChatRequest.model_validate({"model": "pirate", "messages": messages}), "base", derived, DEFAULTS
    )
    assert chat.messages is not None
    assert [m.text() for m in chat.messages if m.role == "system"] == ["Be formal."]


def test_chat_messages_with_images_tool_calls_and_tool_results() -> None:
    body = ChatRequest.model_validate(
        {
            "model": "m",
            "messages": [
                {"role": "user", "content": "Weather?", "images": ["aGk="]},
                {
                    "role": "assistant",
                    "content": "",
                    "tool_calls": [{"function": {"name": "w", "arguments": {"c": "P"}}}],
                },
                {"role": "assistant", "tool_calls": [{"function": {"name": "w", "arguments": '{"c": "T"}'}}]},
                {"role": "tool", "content": "sunny", "tool_name": "w"},
            ],
            "tools": [{"type": "function", "function": {"name": "w", "parameters": {"type": "object"}}}],
            "think": True,
        }
    )
    request = to_chat_request(body, "m", None, DEFAULTS)
    assert request.messages is not None and request.tools == body.tools
    user, first, second, tool = request.messages
    assert user.images() == ["aGk="]
    assert first.tool_calls[0].name == "w" and first.tool_calls[0].arguments == {"c": "P"}
    assert second.tool_calls[0].arguments == {"c": "T"}
    assert tool.role == "tool" and tool.name == "w" and tool.text() == "sunny"


def test_tool_call_arguments_must_be_json_objects() -> None:
    body = ChatRequest.model_validate(
        {
            "model": "m",
            "messages": [{"role": "assistant", "tool_calls": [{"function": {"name": "w", "arguments": "{"}}]}],
        }
    )
    with pytest.raises(InvalidRequestError, match="not JSON"):
        to_chat_request(body, "m", None, DEFAULTS)


def test_generate_objects_and_durations_in_nanoseconds() -> None:
    request = to_generate_request(GenerateRequest(model="m", prompt="Hi"), "m", None, DEFAULTS)
    out = GenerateStream(request, "m:latest")
    chunk = out.chunk(TokenEvent(text="Par"))
    assert chunk["model"] == "m:latest" and chunk["response"] == "Par" and chunk["done"] is False
    assert list(chunk)[:2] == ["model", "created_at"] and "logprobs" not in chunk
    last = out.final(final())
    assert last["done"] is True and last["done_reason"] == "stop" and last["response"] == ""
    assert last["load_duration"] == 1_500_000 and last["prompt_eval_duration"] == 2_000_000
    assert last["eval_duration"] == 30_000_000 and last["total_duration"] >= 40_000_000
    assert last["prompt_eval_count"] == 12 and last["eval_count"] == 3
    assert out.final(final(reason="length"), whole=True)["done_reason"] == "length"
    assert out.final(final(reason="cancelled"))["done_reason"] == "stop"


def test_logprobs_on_the_wire() -> None:
    body = GenerateRequest(model="m", prompt="Hi", logprobs=True, top_logprobs=1)
    out = GenerateStream(to_generate_request(body, "m", None, DEFAULTS), "m")
    item = TokenLogprob(token="Hi", token_id=1, logprob=-0.5, top=[TopLogprob(token="Hi", token_id=1, logprob=-0.5)])
    chunk = out.chunk(TokenEvent(text="Hi", logprobs=[item]))
    top = {"token": "Hi", "logprob": -0.5, "bytes": [72, 105]}
    assert chunk["logprobs"] == [{**top, "top_logprobs": [top]}]


def test_chat_stream_splits_tool_calls_out_of_the_text() -> None:
    body = ChatRequest.model_validate(
        {"model": "m", "messages": [{"role": "user", "content": "x"}], "tools": [{"function": {"name": "w"}}]}
    )
    out = ChatStream(to_chat_request(body, "m", None, DEFAULTS), "m")
    pieces = ["Sure. ", "<tool_", 'call>\n{"name": "w", ', '"arguments": {"c": 1}}\n</tool_call>']
    objects = [out.chunk(event) for event in token_events(pieces)]
    assert objects[0]["message"] == {"role": "assistant", "content": "Sure. "}
    assert objects[-1]["message"]["tool_calls"] == [{"function": {"name": "w", "arguments": {"c": 1}}}]
    assert all("<tool_call>" not in o["message"]["content"] for o in objects)
    last = out.final(final())
    assert last["done"] is True and last["message"] == {"role": "assistant", "content": ""}

    whole = ChatStream(to_chat_request(body, "m", None, DEFAULTS), "m").final(
        final('<tool_call>\n{"name": "w", "arguments": {"c": 2}}\n</tool_call>'), whole=True
    )
    assert whole["message"] == {
        "role": "assistant",
        "content": "",
        "tool_calls": [{"function": {"name": "w", "arguments": {"c": 2}}}],
    }


def test_ndjson_lines_are_single_lines() -> None:
    line = ndjson({"response": "two\nlines", "done": False})
    assert line.endswith("\n") and line.count("\n") == 1 and json.loads(line)["response"] == "two\nlines"


def test_catalogue_facts_in_ollama_terms() -> None:
    assert catalog.parameter_size(134_515_008) == "134.52M" and catalog.parameter_size(8_030_261_248) == "8.0B"
    assert catalog.bare_digest("sha256:abc") == "abc"
    assert catalog.capabilities(["chat", "completion"], "causal-lm") == ["completion", "tools"]
    assert catalog.capabilities(["embeddings"], "embedding") == ["embedding"]
    assert catalog.capabilities(["chat", "completion", "vision"], "image-text") == ["completion", "vision", "tools"]
    text = catalog.parameters_text({"temperature": 0.2, "stop": ["<|im_end|>", "User:"]})
    assert text.splitlines() == [f"{'temperature':<30} 0.2", f'{"stop":<30} "<|im_end|>"', f'{"stop":<30} "User:"']


def test_show_of_a_created_model() -> None:
    derived = DerivedModel(name="pirate", base="smollm2-135m-instruct", system="Arr.", parameters={"temperature": 0})
    info = {
        "family": "llama", "model_type": "llama", "parameters": 134_515_008, "context_length": 8192,
        "capabilities": ["chat", "completion"], "kind": "causal-lm", "modified_at": "2026-01-01T00:00:00Z",
    }  # fmt: skip
    shown = catalog.show(info, {"hidden_size": 576, "dtype": "bfloat16"}, "{{ x }}", derived, derived.base).wire()
    assert shown["details"]["parent_model"] == "smollm2-135m-instruct:latest"
    assert shown["details"]["quantization_level"] == "BF16" and shown["system"] == "Arr."
    assert shown["model_info"]["llama.context_length"] == 8192 and shown["model_info"]["llama.embedding_length"] == 576
    assert 'SYSTEM """Arr."""' in shown["modelfile"] and "PARAMETER temperature 0" in shown["modelfile"]
    assert shown["template"] == "{{ x }}" and shown["capabilities"] == ["completion", "tools"]


def test_copies_share_a_digest_and_running_models_expire() -> None:
    a = DerivedModel(name="a", base="b", system="s")
    assert a.digest == a.model_copy(update={"name": "c"}).digest != DerivedModel(name="a", base="b").digest
    now = datetime(2026, 1, 1, tzinfo=UTC)
    assert catalog.expires_at(None, now).startswith("2318-")
    assert catalog.expires_at(now.timestamp() + 60) == "2026-01-01T00:01:00Z"
    merged = catalog.merge_reports(
        [{"m": json.dumps({"expires_at": 10.0, "size": 1})}, {"m": json.dumps({"expires_at": None, "size": 1})}]
    )
    assert merged["m"]["expires_at"] is None


def test_create_request_reads_from() -> None:
    assert CreateRequest.model_validate({"model": "x", "from": "y"}).from_ == "y"
    assert GenerateRequest.model_validate({"name": "legacy", "prompt": "x"}).model == "legacy"


def test_validation_messages_name_the_field() -> None:
    missing = RequestValidationError([{"type": "missing", "loc": ("body", "model"), "msg": "Field required"}])
    assert validation_message(missing) == "model is required"
