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
from ollm.generation import Constraint, GenerationRequest, ToolCall

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
        type="json_schema", json_schema=schema, prefix=TOOL_CALL_OPEN + "\n", suffix="\n" + TOOL_CALL_CLOSE
    )


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


def parse_tool_calls(text: str) -> tuple[str, list[ToolCall]]:
    """Split model output into its plain content and the tool calls it made.

    A block that is not a valid call stays in the content, so nothing the model wrote is lost.
    """
    calls: list[ToolCall] = []
    content: list[str] = []
    position = 0
    for match in _CALL.finditer(text):
        call = _call_from_json(match.group(1).strip())
        if call is None:
            continue
        content.append(text[position : match.start()])
        calls.append(call)
        position = match.end()
    content.append(text[position:])
    return "".join(content).strip() if calls else text, calls


def split_tool_calls(request: GenerationRequest, text: str) -> tuple[str, list[ToolCall]]:
    """``parse_tool_calls`` when the request offered tools; output is read for calls exactly then
    (OpenAI's tool_choice "none" offers none)."""
    return parse_tool_calls(text) if request.tools else (text, [])


def tool_call_parser(request: GenerationRequest) -> ToolCallParser | None:
    """A streaming parser when the request offered tools (see ``split_tool_calls``), else None."""
    return ToolCallParser() if request.tools else None


class ToolCallParser:
    """The streaming form of parse_tool_calls: content deltas out at once, calls when complete.

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
            hold = _partial_suffix(self._buffer, TOOL_CALL_OPEN)
            content.append(self._buffer[: len(self._buffer) - hold])
            self._buffer = self._buffer[len(self._buffer) - hold :]
            break
        self.calls += completed
        return "".join(content), completed

    def finish(self) -> tuple[str, list[ToolCall]]:
        """End of output: an unclosed call is parsed if it is complete JSON, else returned as text."""
        rest, self._buffer = self._buffer, ""
        if self._inside:
            self._inside = False
            call = _call_from_json(rest.strip())
            if call is not None:
                self.calls.append(call)
                return "", [call]
            return TOOL_CALL_OPEN + rest, []
        return rest, []


def _partial_suffix(text: str, marker: str) -> int:
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
