"""Tool calling, shared by every API family: the model's call format, forcing it, and reading it back.

ollm uses the Hermes/Qwen convention, which most open chat models are trained on: a call is
``<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>`` in the assistant's text. When a
request requires a call (``tool_choice`` "required" or a named function), the engine is given a
grammar constraint that makes any other output impossible, so a call is guaranteed, not hoped for.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

from ollm.errors import InvalidRequestError
from ollm.generation import Constraint, ToolCall

TOOL_CALL_OPEN = "<tool_call>"
TOOL_CALL_CLOSE = "</tool_call>"
_CALL = re.compile(re.escape(TOOL_CALL_OPEN) + r"(.*?)(?:" + re.escape(TOOL_CALL_CLOSE) + r"|\Z)", re.DOTALL)


def function_spec(tool: dict[str, Any]) -> dict[str, Any]:
    """A tool as {name, description, parameters}, from OpenAI's nested or Responses' flat shape."""
    spec = tool.get("function", tool)
    name = spec.get("name")
    if not isinstance(name, str) or not name:
        raise InvalidRequestError("every tool needs a function name", param="tools")
    parameters = spec.get("parameters") or {"type": "object", "properties": {}}
    return {"name": name, "description": spec.get("description") or "", "parameters": parameters}


def tool_call_constraint(tools: list[dict[str, Any]], choice: str) -> Constraint:
    """Force one call: to any of ``tools`` for choice "required", else to the function named ``choice``."""
    specs = [function_spec(tool) for tool in tools]
    if choice != "required":
        specs = [spec for spec in specs if spec["name"] == choice]
        if not specs:
            raise InvalidRequestError(
                f"tool_choice names function {choice!r}, which is not in tools", param="tool_choice"
            )
    if not specs:
        raise InvalidRequestError("tool_choice 'required' needs at least one tool", param="tool_choice")
    variants = [
        {
            "type": "object",
            "properties": {"name": {"const": spec["name"]}, "arguments": spec["parameters"]},
            "required": ["name", "arguments"],
            "additionalProperties": False,
        }
        for spec in specs
    ]
    schema = variants[0] if len(variants) == 1 else {"anyOf": variants}
    return Constraint(
        type="json_schema", json_schema=schema, prefix=TOOL_CALL_OPEN + "\n", suffix="\n" + TOOL_CALL_CLOSE,
        calls=[spec["name"] for spec in specs],
    )  # fmt: skip


def render_tool_call(call: ToolCall) -> str:
    return f"{TOOL_CALL_OPEN}\n{json.dumps({'name': call.name, 'arguments': call.arguments})}\n{TOOL_CALL_CLOSE}"


def tools_system_prompt(tools: list[dict[str, Any]]) -> str:
    """Tool instructions for chat templates that have no tool support of their own."""
    listed = "\n".join(json.dumps(function_spec(tool)) for tool in tools)
    return (
        "You can call these tools, described as JSON schemas:\n<tools>\n"
        f"{listed}\n</tools>\n"
        "To call a tool, reply with only:\n"
        f'{TOOL_CALL_OPEN}\n{{"name": "<tool name>", "arguments": {{<arguments as JSON>}}}}\n{TOOL_CALL_CLOSE}'
    )


def _call_from_json(body: str) -> ToolCall | None:
    try:
        data = json.loads(body)
    except json.JSONDecodeError:
        return None
    if not isinstance(data, dict) or not isinstance(data.get("name"), str):
        return None
    arguments = data.get("arguments", data.get("parameters", {}))
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments)
        except json.JSONDecodeError:
            return None
    if not isinstance(arguments, dict):
        return None
    return ToolCall(name=data["name"], arguments=arguments)


def read_partial_object(text: str) -> dict[str, Any]:
    """What can be read of a JSON object cut short: open strings and brackets are closed, a
    dangling key or separator dropped (``{"city": "Par`` reads as ``{"city": "Par"}``); {} if nothing."""
    closers: list[str] = []
    in_string = escaped = False
    for char in text:
        if in_string:
            if escaped:
                escaped = False
            elif char == "\\":
                escaped = True
            elif char == '"':
                in_string = False
        elif char == '"':
            in_string = True
        elif char in "{[":
            closers.append("}" if char == "{" else "]")
        elif char in "}]" and closers:
            closers.pop()
    # A cut escape ("\\) is dropped with its backslash; an open string is closed.
    candidate = (text[:-1] if escaped else text) + ('"' if in_string else "")
    # As cut; without a dangling separator; without a dangling key.
    trimmed = candidate.rstrip().rstrip(",:").rstrip()
    for attempt in (candidate, trimmed, re.sub(r',?\s*"[^"]*"\s*:?\s*$', "", candidate)):
        try:
            data = json.loads(attempt + "".join(reversed(closers)))
        except json.JSONDecodeError:
            continue
        if isinstance(data, dict):
            return data
    return {}


def call_from_arguments(name: str, body: str) -> ToolCall:
    """A call from its name and argument text; arguments that are not a complete JSON object make a
    partial call (the raw text kept, what could be read of it parsed)."""
    try:
        arguments = json.loads(body)
    except json.JSONDecodeError:
        arguments = None
    if isinstance(arguments, dict):
        return ToolCall(name=name, arguments=arguments)
    return ToolCall(name=name, arguments=read_partial_object(body), partial_arguments=body)


_PARTIAL_NAME = re.compile(r'"name"\s*:\s*"((?:[^"\\]|\\.)*)')
_PARTIAL_ARGUMENTS = re.compile(r'"(?:arguments|parameters)"\s*:\s*')


def partial_call(body: str) -> ToolCall:
    """A ``<tool_call>`` block cut short (max tokens): the name and arguments written so far."""
    name = _PARTIAL_NAME.search(body)
    arguments = _PARTIAL_ARGUMENTS.search(body)
    text = body[arguments.end() :] if arguments else ""
    return call_from_arguments(name.group(1) if name else "", text)


class ToolCallParser:
    """Content deltas out at once, calls when complete; a block that is not a valid call stays content.

    Text that might be the start of ``<tool_call>`` is held back until it is clearly not.
    """

    def __init__(self) -> None:
        self._buffer = ""
        self._inside = False
        self.calls: list[ToolCall] = []

    def feed(self, text: str) -> tuple[str, list[ToolCall]]:
        self._buffer += text
        content: list[str] = []
        completed: list[ToolCall] = []
        while True:
            if self._inside:
                end = self._buffer.find(TOOL_CALL_CLOSE)
                if end < 0:
                    break
                body, self._buffer = self._buffer[:end], self._buffer[end + len(TOOL_CALL_CLOSE) :]
                self._inside = False
                call = _call_from_json(body.strip())
                if call is None:
                    content.append(TOOL_CALL_OPEN + body + TOOL_CALL_CLOSE)
                else:
                    completed.append(call)
                continue
            start = self._buffer.find(TOOL_CALL_OPEN)
            if start >= 0:
                content.append(self._buffer[:start])
                self._buffer = self._buffer[start + len(TOOL_CALL_OPEN) :]
                self._inside = True
                continue
            hold = partial_suffix(self._buffer, TOOL_CALL_OPEN)
            content.append(self._buffer[: len(self._buffer) - hold])
            self._buffer = self._buffer[len(self._buffer) - hold :]
            break
        self.calls += completed
        return "".join(content), completed

    def finish(self) -> tuple[str, list[ToolCall]]:
        """End of output: an unclosed call is a call (a partial one when cut short), never markup."""
        rest, self._buffer = self._buffer, ""
        if self._inside:
            self._inside = False
            call = _call_from_json(rest.strip()) or partial_call(rest.strip())
            self.calls.append(call)
            return "", [call]
        return rest, []


def partial_suffix(text: str, marker: str) -> int:
    for size in range(min(len(marker) - 1, len(text)), 0, -1):
        if text.endswith(marker[:size]):
            return size
    return 0


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
