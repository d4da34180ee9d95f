"""Translation helpers every OpenAI family shares: stops, finish reasons, usage, tool arguments, n.

Pure functions over ``ollm.generation``: chat completions, completions and Responses differ in
wire shape, not in what "stop" or a finish reason mean, so those meanings live here once. What
every API family shares (images, JSON output, tool_choice) is in ``server.translation`` and
``ollm.tools``.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Mapping
from typing import Any, Literal, cast

from openai.types.completion_usage import CompletionUsage

from ollm.errors import InvalidRequestError
from ollm.generation import FinalEvent, FinishReason, GenerationRequest, ReasoningEffort, ToolCall, Usage

OpenAIFinish = Literal["stop", "length", "tool_calls"]


def new_id() -> str:
    return uuid.uuid4().hex


def stop_list(stop: str | list[str] | None) -> list[str] | None:
    """OpenAI's ``stop`` is a string or a list; None keeps the configured default (no stops)."""
    if stop is None:
        return None
    stops = [stop] if isinstance(stop, str) else stop
    if any(not s for s in stops):
        raise InvalidRequestError("stop sequences must not be empty", param="stop")
    return stops


def finish_reason(reason: FinishReason, called_tools: bool = False) -> OpenAIFinish:
    # Cut short wins over a call: a call cut by max tokens is partial, and the client must know.
    if reason == "length":
        return "length"
    # OpenAI has no "cancelled"; a cancelled request is only ever seen by a client that went away.
    return "tool_calls" if called_tools else "stop"


def think_of(effort: str | None) -> bool | ReasoningEffort | None:
    """OpenAI's reasoning effort as ``GenerationRequest.think``."""
    if effort is None:
        return None
    if effort == "none":
        return False
    return "low" if effort == "minimal" else cast(ReasoningEffort, effort)


def completion_usage(usage: Usage) -> CompletionUsage:
    return CompletionUsage(
        prompt_tokens=usage.prompt_tokens, completion_tokens=usage.completion_tokens, total_tokens=usage.total_tokens
    )


def parse_arguments(text: str, param: str) -> dict[str, Any]:
    """Tool-call arguments arrive as a JSON string on the wire; internally they are an object."""
    try:
        arguments = json.loads(text or "{}")
    except json.JSONDecodeError as exc:
        raise InvalidRequestError(f"tool call arguments are not JSON: {exc}", param=param) from None
    if not isinstance(arguments, dict):
        raise InvalidRequestError("tool call arguments must be a JSON object", param=param)
    return arguments


def arguments_json(call: ToolCall) -> str:
    """The arguments as the wire's JSON string; a partial call's exactly as far as they were written."""
    if call.partial_arguments is not None:
        return call.partial_arguments
    return json.dumps(call.arguments, ensure_ascii=False)


def total_usage(finals: Mapping[int, FinalEvent], n: int) -> Usage:
    """Usage of fanned-out requests (``fan_out``): request ``i`` is choice ``i % n`` of prompt
    ``i // n``. Each prompt is counted once, however many of its ``n`` choices read it (OpenAI's
    rule); every choice's completion counts."""
    return Usage(
        prompt_tokens=sum(final.usage.prompt_tokens for index, final in finals.items() if index % n == 0),
        completion_tokens=sum(final.usage.completion_tokens for final in finals.values()),
    )


def fan_out(request: GenerationRequest, n: int) -> list[GenerationRequest]:
    """``n`` choices are ``n`` requests; a given seed becomes seed, seed+1, ... so each choice differs
    yet the whole answer stays reproducible."""
    if n == 1:
        return [request]
    seed = request.sampling.seed
    return [
        request.model_copy(
            update={
                "id": new_id(),
                "sampling": request.sampling.model_copy(update={"seed": None if seed is None else seed + i}),
            }
        )
        for i in range(n)
    ]
