"""Ollama /api generation: pure translation between Ollama's wire format and the internal model.

Nothing here does I/O, so every mapping is unit-tested without a server (tests/ollama). The
HTTP wiring (api_router.py) resolves model names, dispatches and streams; this module decides
what an Ollama request means (``to_generate_request``, ``to_chat_request``) and how events look
to an Ollama client (``generate_chunk``, ``chat_chunk``, ``*_final``).
"""

from __future__ import annotations

import json
import math
import re
import time
import uuid
from collections.abc import Iterable
from datetime import UTC, datetime
from typing import Any

from pydantic import ValidationError

from ollm.derived import DerivedModel
from ollm.errors import InvalidRequestError
from ollm.generation import (
    ChatMessage,
    Constraint,
    ContentPart,
    FinalEvent,
    FinishReason,
    GenerationRequest,
    SamplingParams,
    TokenEvent,
    TokenLogprob,
)
from ollm.generation import ToolCall as InternalToolCall
from ollm.sampling_defaults import sampling_params
from ollm.settings import GenerationSettings
from server.ollama.protocol import (
    ChatRequest,
    ChatResponse,
    FormatValue,
    FunctionCall,
    GenerateRequest,
    GenerateResponse,
    KeepAliveValue,
    Logprob,
    Message,
    Options,
    OutMessage,
    OutToolCall,
    Timings,
    TopLogprob,
)

# Ollama's default keep_alive (OLLAMA_KEEP_ALIVE): five minutes after the last request.
DEFAULT_KEEP_ALIVE_SECONDS = 300.0
_NS_PER_MS = 1_000_000
_MAX_DURATION_SECONDS = (2**63 - 1) / 1e9
_DURATION_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|ms|s|m|h)")
_UNIT_SECONDS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}
# Go templates (Ollama's own) use {{ .Field }}; ollm renders Jinja chat templates only.
_GO_TEMPLATE = re.compile(r"\{\{-?\s*(\.|if\s+\.|range\s+\.|end\b)")


# ---- names and durations ---------------------------------------------------------------------


def model_name(name: str) -> str:
    """The name without Ollama's default ``:latest`` tag, which ollm's references never carry."""
    name = name.strip()
    return name[: -len(":latest")] if name.endswith(":latest") else name


def display_name(name: str) -> str:
    """A name as Ollama lists it: always with a tag."""
    return name if ":" in name.rsplit("/", 1)[-1] else f"{name}:latest"


def keep_alive_seconds(value: KeepAliveValue) -> float | None:
    """Seconds to keep the model loaded after this request; None keeps it forever (negative values).

    Numbers are seconds; strings are Go durations ("5m", "1h30m", "300ms") or bare numbers.
    """
    if value is None:
        return DEFAULT_KEEP_ALIVE_SECONDS
    if isinstance(value, int | float):
        seconds = float(value)
    else:
        text = value.strip()
        try:
            seconds = float(text)
        except ValueError:
            seconds = _go_duration(text)
    if math.isnan(seconds) or seconds > _MAX_DURATION_SECONDS:
        # Go's (Ollama's) durations end there; Redis would refuse the expiry anyway.
        raise InvalidRequestError(
            f"keep_alive: {value!r} is not a duration ollm can keep (at most about 292 years); use -1 to keep the "
            "model loaded until the worker stops",
            param="keep_alive",
        )
    return None if seconds < 0 else seconds


def _go_duration(text: str) -> float:
    sign = -1.0 if text.startswith("-") else 1.0
    body = text.lstrip("+-")
    parts = _DURATION_PART.findall(body)
    if not body or "".join(number + unit for number, unit in parts) != body:
        raise InvalidRequestError(
            f'keep_alive: invalid duration "{text}" (use seconds, or a duration such as "5m", "1h", "-1")',
            param="keep_alive",
        )
    return sign * sum(float(number) * _UNIT_SECONDS[unit] for number, unit in parts)


def now_iso() -> str:
    return datetime.now(UTC).isoformat().replace("+00:00", "Z")


def nanoseconds(milliseconds: float) -> int:
    return int(round(milliseconds * _NS_PER_MS))


# ---- requests --------------------------------------------------------------------------------


def options_of(*layers: dict[str, Any] | None) -> Options:
    """Merge option dicts (later layers win: model defaults, then the request) and validate them."""
    merged: dict[str, Any] = {}
    for layer in layers:
        merged.update({key: value for key, value in (layer or {}).items() if value is not None})
    try:
        return Options.model_validate(merged)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(part) for part in first["loc"])
        raise InvalidRequestError(f"options.{where}: {first['msg']}", param=f"options.{where}") from None


def sampling_of(
    options: Options, defaults: GenerationSettings, logprobs: bool = False, top_logprobs: int | None = None
) -> SamplingParams:
    stop = [options.stop] if isinstance(options.stop, str) else options.stop
    # num_predict -1 (until the context is full) and -2 (fill the context) have no fixed budget
    # here: the configured default applies; the engine still stops at the model's context.
    max_new_tokens = options.num_predict if options.num_predict is not None and options.num_predict > 0 else None
    return sampling_params(
        defaults,
        max_new_tokens=max_new_tokens,
        temperature=options.temperature,
        top_p=options.top_p,
        top_k=options.top_k,
        min_p=options.min_p,
        seed=options.seed,
        stop=stop,
        repetition_penalty=options.repeat_penalty,
        repeat_last_n=options.repeat_last_n,
        frequency_penalty=options.frequency_penalty,
        presence_penalty=options.presence_penalty,
        logprobs=logprobs or bool(top_logprobs),
        top_logprobs=top_logprobs if (logprobs or top_logprobs) else None,
    )


def constraint_of(format: FormatValue) -> Constraint | None:
    if format is None or format == "":
        return None
    if format == "json":
        return Constraint(type="json_object")
    if isinstance(format, dict):
        return Constraint(type="json_schema", json_schema=format)
    raise InvalidRequestError(f'format: invalid value {format!r}; use "json" or a JSON schema object', param="format")


def check_template(template: str | None) -> str | None:
    if template and _GO_TEMPLATE.search(template):
        raise InvalidRequestError(
            "template: this looks like an Ollama Go template ({{ .Prompt }}); ollm renders Hugging Face "
            "Jinja chat templates (over `messages`, as in tokenizer_config.json)",
            param="template",
        )
    return template or None


def from_message(message: Message) -> ChatMessage:
    text = message.content or ""
    content: str | list[ContentPart] = text
    if message.images:
        content = [ContentPart(type="text", text=text)] + [ContentPart(type="image", image=i) for i in message.images]
    calls = []
    for call in message.tool_calls or []:
        arguments = call.function.arguments
        if isinstance(arguments, str):
            try:
                arguments = json.loads(arguments or "{}")
            except json.JSONDecodeError as exc:
                raise InvalidRequestError(
                    f"tool call {call.function.name} has arguments that are not JSON: {exc}", param="messages"
                ) from None
        if not isinstance(arguments, dict):
            raise InvalidRequestError(f"tool call {call.function.name}: arguments must be an object", param="messages")
        calls.append(InternalToolCall(name=call.function.name, arguments=arguments))
    return ChatMessage(
        role=message.role, content=content, tool_calls=calls,
        name=message.tool_name if message.role == "tool" else None, reasoning=message.thinking or "",
    )  # fmt: skip


def _preamble(derived: DerivedModel | None, system: str | None, model_system: bool = True) -> list[ChatMessage]:
    """The system prompt (the request's, else the created model's) and the model's pre-conversation."""
    out = []
    system = system or (derived.system if derived and model_system else None)
    if system:
        out.append(ChatMessage(role="system", content=system))
    if derived:
        out += [from_message(Message.model_validate(m)) for m in derived.messages]
    return out


def to_generate_request(
    body: GenerateRequest, model: str, derived: DerivedModel | None, defaults: GenerationSettings
) -> GenerationRequest:
    """``model`` is the base model to dispatch to (a created model's name already resolved)."""
    if body.suffix:
        raise InvalidRequestError(f"{body.model} does not support insert", param="suffix")
    options = options_of(derived.parameters if derived else None, body.options)
    common: dict[str, Any] = {
        "model": model,
        "sampling": sampling_of(options, defaults, body.logprobs, body.top_logprobs),
        "constraint": constraint_of(body.format),
    }
    if body.raw:
        # Raw: the prompt is the whole model input; no template, no system prompt (as in Ollama).
        if body.images:
            raise InvalidRequestError("images need the chat template; they cannot be sent with raw", param="images")
        return GenerationRequest(prompt=body.prompt or "", **common)
    user = Message(role="user", content=body.prompt or "", images=body.images)
    template = check_template(body.template) or (derived.template if derived else None)
    return GenerationRequest(
        messages=[*_preamble(derived, body.system), from_message(user)], chat_template=template, think=body.think,
        **common,
    )  # fmt: skip


def to_chat_request(
    body: ChatRequest, model: str, derived: DerivedModel | None, defaults: GenerationSettings
) -> GenerationRequest:
    options = options_of(derived.parameters if derived else None, body.options)
    messages = [from_message(m) for m in body.messages]
    has_system = any(m.role == "system" for m in messages)
    return GenerationRequest(
        model=model,
        # A system message in the request replaces the created model's system prompt, as in Ollama.
        messages=[*_preamble(derived, None, model_system=not has_system), *messages],
        tools=body.tools or None,
        chat_template=derived.template if derived else None,
        sampling=sampling_of(options, defaults, body.logprobs, body.top_logprobs),
        constraint=constraint_of(body.format),
        think=body.think,
    )


# ---- responses -------------------------------------------------------------------------------


def done_reason(reason: FinishReason) -> str:
    # Ollama knows "stop" and "length" (plus "load"/"unload"); a call or a cancel ends like a stop.
    return "length" if reason == "length" else "stop"


def timings(final: FinalEvent, elapsed_ms: float) -> Timings:
    t = final.timings
    return Timings(
        # The server's wall clock covers queueing and relaying too: what the client waited.
        total_duration=nanoseconds(max(t.total_ms, elapsed_ms)),
        load_duration=nanoseconds(t.load_ms),
        prompt_eval_count=final.usage.prompt_tokens,
        prompt_eval_duration=nanoseconds(t.prompt_eval_ms),
        eval_count=final.usage.completion_tokens,
        eval_duration=nanoseconds(t.generation_ms),
    )


def logprobs_of(items: Iterable[TokenLogprob]) -> list[Logprob]:
    return [
        Logprob(
            token=item.token, logprob=item.logprob, bytes=list(item.token.encode()),
            top_logprobs=[TopLogprob(token=t.token, logprob=t.logprob, bytes=list(t.token.encode())) for t in item.top],
        )
        for item in items
    ]  # fmt: skip


def _wire_calls(calls: list[InternalToolCall]) -> list[OutToolCall] | None:
    return [OutToolCall(function=FunctionCall(name=c.name, arguments=c.arguments)) for c in calls] or None


class GenerateStream:
    """The NDJSON objects of one /api/generate (``stream``) or its single answer (not streamed)."""

    def __init__(self, request: GenerationRequest, model: str, started: float | None = None) -> None:
        self.request = request
        self.model = model
        self.started = started if started is not None else time.monotonic()

    def _logprobs(self, items: list[TokenLogprob]) -> list[Logprob] | None:
        return logprobs_of(items) if self.request.sampling.logprobs else None

    def chunk(self, event: TokenEvent) -> dict[str, Any]:
        return GenerateResponse(
            model=self.model, created_at=now_iso(), response=event.text, thinking=event.reasoning or None, done=False,
            logprobs=self._logprobs(event.logprobs),
        ).wire()  # fmt: skip

    def final(
        self, final: FinalEvent, whole: bool = False, logprobs: list[TokenLogprob] | None = None
    ) -> dict[str, Any]:
        """The last object; ``whole``: the whole response when not streamed (nothing more when it was)."""
        elapsed = (time.monotonic() - self.started) * 1000
        text = final.text if whole else ""
        return GenerateResponse(
            model=self.model, created_at=now_iso(), response=text, thinking=(whole and final.reasoning) or None,
            done=True,
            done_reason=done_reason(final.finish_reason), logprobs=self._logprobs(logprobs or []) if text else None,
            **timings(final, elapsed).model_dump(),
        ).wire()  # fmt: skip


class ChatStream:
    """The same for /api/chat; with tools, calls are split out of the text as they complete."""

    def __init__(self, request: GenerationRequest, model: str, started: float | None = None) -> None:
        self.request = request
        self.model = model
        self.started = started if started is not None else time.monotonic()

    def _object(
        self,
        content: str,
        thinking: str,
        calls: list[InternalToolCall],
        logprobs: list[TokenLogprob] | None,
        done: bool,
        **extra: Any,
    ) -> dict[str, Any]:
        message = OutMessage(content=content, thinking=thinking or None, tool_calls=_wire_calls(calls))
        return ChatResponse(
            model=self.model, created_at=now_iso(), message=message, done=done,
            logprobs=logprobs_of(logprobs) if self.request.sampling.logprobs and logprobs else None, **extra,
        ).wire()  # fmt: skip

    def chunk(self, event: TokenEvent) -> dict[str, Any]:
        return self._object(event.text, event.reasoning, event.tool_calls, event.logprobs, done=False)

    def final(
        self, final: FinalEvent, whole: bool = False, logprobs: list[TokenLogprob] | None = None
    ) -> dict[str, Any]:
        """The last object, with the statistics; ``whole``: the whole answer of a request not streamed."""
        elapsed = (time.monotonic() - self.started) * 1000
        content, thinking, calls = (final.text, final.reasoning, final.tool_calls) if whole else ("", "", [])
        return self._object(
            content, thinking, calls, logprobs, done=True, done_reason=done_reason(final.finish_reason),
            **timings(final, elapsed).model_dump(),
        )  # fmt: skip


def residency_response(model: str, chat: bool, reason: str) -> dict[str, Any]:
    """The answer to an empty prompt (``reason`` "load") or an empty prompt with keep_alive 0 ("unload")."""
    if chat:
        return ChatResponse(
            model=model, created_at=now_iso(), message=OutMessage(content=""), done=True, done_reason=reason
        ).wire()
    return GenerateResponse(model=model, created_at=now_iso(), response="", done=True, done_reason=reason).wire()


def ndjson(obj: dict[str, Any]) -> str:
    """One NDJSON line: compact JSON (no raw newlines inside) and a newline."""
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False) + "\n"


def error_line(message: str) -> str:
    return ndjson({"error": message})


def stamp() -> str:
    """A keep-alive stamp: sorts by time (workers take the newest), unique across servers."""
    return f"{time.time_ns():020d}-{uuid.uuid4().hex[:8]}"
