"""Translation helpers every OpenAI family shares: stops, finish reasons, usage, images, tools, n.

Pure functions over ``ollm.generation`` and ``ollm.tools``: chat completions, completions and
Responses differ in wire shape, not in what "stop", "a data: URI image" or "tool_choice required"
mean, so those meanings live here once.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

from openai.types.completion_usage import CompletionUsage

from ollm.errors import InvalidRequestError
from ollm.generation import Constraint, ContentPart, FinalEvent, FinishReason, GenerationRequest, ToolCall, Usage
from ollm.tools import function_spec, tool_call_constraint

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
    if called_tools:
        return "tool_calls"
    # OpenAI has no "cancelled"; a cancelled request is only ever seen by a client that went away.
    return "length" if reason == "length" else "stop"


def completion_usage(usage: Usage) -> CompletionUsage:
    return CompletionUsage(
        prompt_tokens=usage.prompt_tokens, completion_tokens=usage.completion_tokens, total_tokens=usage.total_tokens
    )


def image_part(url: str, param: str) -> ContentPart:
    """An image given by URL: only inline ``data:`` URIs, since the server never fetches URLs."""
    if not url.startswith("data:"):
        raise InvalidRequestError(
            "images must be inline data: URIs (data:image/png;base64,...); ollm does not fetch URLs", param=param
        )
    return ContentPart(type="image", image=url)


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
    return json.dumps(call.arguments, ensure_ascii=False)


def json_constraint(kind: str, schema: dict[str, Any] | None, param: str) -> Constraint | None:
    """``response_format`` / ``text.format``: text (none), json_object, or json_schema."""
    if kind == "text":
        return None
    if kind == "json_object":
        return Constraint(type="json_object")
    if schema is None:
        raise InvalidRequestError("a json_schema format needs its schema", param=param)
    return Constraint(type="json_schema", json_schema=schema)


@dataclass
class ToolPlan:
    """What a request's ``tools`` + ``tool_choice`` mean for the engine and for reading its output."""

    tools: list[dict[str, Any]] | None = None
    # Set for "required" / a named function: the grammar makes a call the only possible output.
    constraint: Constraint | None = None
    choice: str = "none"

    @property
    def parses(self) -> bool:
        """Whether the output is scanned for calls (never with "none": the model was not offered any)."""
        return self.tools is not None


def tool_plan(tools: list[dict[str, Any]] | None, choice: str | None) -> ToolPlan:
    """``choice`` is "none" | "auto" | "required" | a function name; None means OpenAI's default."""
    if not tools:
        if choice not in (None, "none", "auto"):
            raise InvalidRequestError(f"tool_choice {choice!r} needs tools", param="tool_choice")
        return ToolPlan()
    names = [function_spec(tool)["name"] for tool in tools]
    if len(set(names)) != len(names):
        raise InvalidRequestError("tool function names must be unique", param="tools")
    choice = choice or "auto"
    if choice == "none":
        # Not offered at all: a model that sees tools may call one even when told not to.
        return ToolPlan(choice="none")
    constraint = None if choice == "auto" else tool_call_constraint(tools, choice)
    return ToolPlan(tools=tools, constraint=constraint, choice=choice)


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
