"""gpt-oss's harmony format: rendering a conversation into it and parsing the model's answer out of it.

Harmony writes every message as ``<|start|>{role}<|message|>{text}<|end|>``; an assistant message
names its channel (``<|channel|>analysis`` = chain of thought, ``commentary`` = tool calls and
preambles, ``final`` = the answer) and a tool call its recipient (``to=functions.NAME``, with
``<|constrain|>json`` before its arguments, ended by ``<|call|>``); the last answer ends with
``<|return|>``. OpenAI's ``openai-harmony`` package does the same but downloads its vocabulary on
first use, which a machine without network cannot do, so ollm renders and parses it here.
"""

from __future__ import annotations

import json
import re
from datetime import UTC, datetime
from typing import Any

from ollm.generation import ChatMessage, GenerationRequest, ReasoningEffort
from ollm.reasoning import Split
from ollm.tools import ToolCallParser, call_from_arguments, function_spec

START, END, MESSAGE, CHANNEL = "<|start|>", "<|end|>", "<|message|>", "<|channel|>"
RETURN, CALL, CONSTRAIN = "<|return|>", "<|call|>", "<|constrain|>"
MARKERS = (START, END, MESSAGE, CHANNEL, RETURN, CALL, CONSTRAIN)
DEFAULT_EFFORT: ReasoningEffort = "medium"
_RECIPIENT = re.compile(r"to=(\S+)")
# A header is a few words ("analysis", "commentary to=functions.x <|constrain|>json"); text that
# grows past this, or has a newline, is an answer written without any channel.
_HEADER_LIMIT = 128


# ---- rendering -------------------------------------------------------------------------------


def effort_of(think: bool | ReasoningEffort | None) -> ReasoningEffort:
    """gpt-oss cannot stop reasoning; ``think`` false asks for as little as it does (low)."""
    if think is False:
        return "low"
    return DEFAULT_EFFORT if think is None or think is True else think


def _ts_type(schema: dict[str, Any]) -> str:
    """A JSON schema as the TypeScript-like type harmony declares tool parameters in."""
    if "enum" in schema:
        return " | ".join(json.dumps(value) for value in schema["enum"])
    kind = schema.get("type")
    if kind == "array":
        return f"{_ts_type(schema.get('items') or {})}[]"
    if kind == "object" and schema.get("properties"):
        return "{\n" + _ts_fields(schema) + "}"
    return {"string": "string", "integer": "number", "number": "number", "boolean": "boolean"}.get(str(kind), "any")


def _ts_fields(schema: dict[str, Any]) -> str:
    required = set(schema.get("required") or [])
    lines = []
    for name, prop in (schema.get("properties") or {}).items():
        if prop.get("description"):
            lines.append(f"// {prop['description']}\n")
        optional = "" if name in required else "?"
        default = f", // default: {json.dumps(prop['default'])}" if "default" in prop else ","
        lines.append(f"{name}{optional}: {_ts_type(prop)}{default}\n")
    return "".join(lines)


def tools_namespace(tools: list[dict[str, Any]]) -> str:
    out = ["## functions\n\nnamespace functions {\n\n"]
    for tool in tools:
        spec = function_spec(tool)
        if spec["description"]:
            out.append(f"// {spec['description']}\n")
        parameters = spec["parameters"]
        if parameters.get("properties"):
            out.append(f"type {spec['name']} = (_: {{\n{_ts_fields(parameters)}}}) => any;\n\n")
        else:
            out.append(f"type {spec['name']} = () => any;\n\n")
    out.append("} // namespace functions")
    return "".join(out)


def _message(role: str, text: str, channel: str | None = None, recipient: str | None = None, end: str = END) -> str:
    header = role + (f" to={recipient}" if recipient else "") + (f"{CHANNEL}{channel}" if channel else "")
    return f"{START}{header}{MESSAGE}{text}{end}"


def render(request: GenerationRequest, today: datetime | None = None) -> str:
    """The conversation as harmony text, ending with ``<|start|>assistant`` for the model to continue.

    System and developer messages become the developer message's instructions (harmony's system
    message is the model's own: date, reasoning level, channels). An earlier assistant turn keeps
    its analysis only while its tool calls are still being answered: harmony drops the reasoning
    of turns that reached a final answer.
    """
    assert request.messages is not None
    date = (today or datetime.now(UTC)).strftime("%Y-%m-%d")
    system = (
        "You are ChatGPT, a large language model trained by OpenAI.\nKnowledge cutoff: 2024-06\n"
        f"Current date: {date}\n\nReasoning: {effort_of(request.think)}\n\n"
        "# Valid channels: analysis, commentary, final. Channel must be included for every message."
    )
    if request.tools:
        system += "\nCalls to these tools must go to the commentary channel: 'functions'."
    out = [_message("system", system)]
    instructions = "\n\n".join(m.text() for m in request.messages if m.role in ("system", "developer"))
    developer = f"# Instructions\n\n{instructions}" if instructions else ""
    if request.tools:
        developer += ("\n\n" if developer else "") + "# Tools\n\n" + tools_namespace(request.tools)
    if developer:
        out.append(_message("developer", developer))
    last_user = max((i for i, m in enumerate(request.messages) if m.role == "user"), default=-1)
    names: dict[str, str] = {}
    for index, message in enumerate(request.messages):
        if message.role == "user":
            out.append(_message("user", message.text()))
        elif message.role == "assistant":
            out += _assistant(message, keep_reasoning=index > last_user)
            names.update({call.id: call.name for call in message.tool_calls})
        elif message.role == "tool":
            name = message.name or names.get(message.tool_call_id or "", "tool")
            out.append(_message(f"functions.{name}", message.text(), "commentary", recipient="assistant"))
    return "".join(out) + START + "assistant"


def _assistant(message: ChatMessage, keep_reasoning: bool) -> list[str]:
    out = []
    if message.reasoning and keep_reasoning:
        out.append(_message("assistant", message.reasoning, "analysis"))
    if message.text():
        out.append(_message("assistant", message.text(), "commentary" if message.tool_calls else "final"))
    for call in message.tool_calls:
        header = f"commentary to=functions.{call.name} {CONSTRAIN}json"
        out.append(f"{START}assistant{CHANNEL}{header}{MESSAGE}{json.dumps(call.arguments)}{CALL}")
    return out


def forced_call_header(names: list[str]) -> str:
    """What the prompt ends with when a call is forced: to one tool, its header (only the arguments
    are left to write); to one of several, a commentary message (the grammar writes a <tool_call>)."""
    if len(names) == 1:
        return f"{CHANNEL}commentary to=functions.{names[0]} {CONSTRAIN}json{MESSAGE}"
    return f"{CHANNEL}commentary{MESSAGE}"


# ---- parsing ---------------------------------------------------------------------------------


class HarmonyParser:
    """Splits an answer fed piece by piece into reasoning, content and tool calls as it goes.

    Pieces are decoded text, or one of harmony's special tokens (``special``: the engine knows
    which ids they are, so a model writing "<|end|>" as plain text is not taken for one). The
    answer continues the prompt's ``<|start|>assistant``; ``header`` is any header text the
    prompt already wrote after it (a forced call). Analysis streams as reasoning, final and
    commentary preambles as content; a call is emitted when its message ends, or as a partial
    call when the output ends first. No marker ever reaches the content.
    """

    def __init__(self, header: str = "", tools: bool = False) -> None:
        # Content is read for <tool_call> markup too when tools were offered (a forced choice among
        # several tools is written that way, in a commentary message).
        self._calls = ToolCallParser() if tools else None
        self._in_body = False
        self._role_part = ""
        self._channel_part: str | None = None
        self._kind = "content"
        self._recipient = ""
        self._body = ""
        for piece in re.split("(" + "|".join(re.escape(m) for m in MARKERS) + ")", header):
            if piece:
                self.feed(piece, special=piece in MARKERS)

    @property
    def reasoning_open(self) -> bool:
        return self._in_body and self._kind == "reasoning"

    def feed(self, text: str, special: bool = False) -> Split:
        if special:
            return self._marker(text)
        if self._in_body:
            return self._text(text)
        if self._channel_part is None:
            self._role_part += text
        else:
            self._channel_part += text
        if self._channel_part is None and (len(self._role_part) > _HEADER_LIMIT or "\n" in self._role_part):
            # No header after all: the model answered without channels.
            bare, self._role_part = self._role_part, ""
            self._open("content", "")
            return self._text(bare)
        return Split()

    def finish(self) -> Split:
        """The output ended (end of sequence, stop or max tokens): whatever message is open ends with it."""
        if self._in_body:
            out = self._close()
        else:
            bare, self._role_part = self._role_part, ""
            out = self._content(bare if self._channel_part is None else "")
        if self._calls is not None:
            content, calls = self._calls.finish()
            out.add(Split(content=content, calls=calls))
        return out

    def _marker(self, marker: str) -> Split:
        if marker == MESSAGE:
            if not self._in_body:
                self._open_from_header()
            return Split()
        if marker == CONSTRAIN:
            if not self._in_body and self._channel_part is not None:
                self._channel_part += " "
            return Split()
        out = self._close() if self._in_body else Split()
        if marker == CHANNEL:
            # A channel without a new <|start|> continues the same role (or repairs a missing <|end|>).
            self._channel_part = ""
        elif marker == START:
            self._role_part, self._channel_part = "", None
        else:  # END, RETURN, CALL: between messages
            self._role_part, self._channel_part = "", None
        return out

    def _open_from_header(self) -> None:
        """Analysis is reasoning, a message to a function is a call, anything else (final,
        commentary preambles, a missing or unknown channel) is answer content."""
        words = (self._channel_part or "").split()
        found = _RECIPIENT.search(f"{self._role_part} {self._channel_part or ''}")
        recipient = found.group(1) if found else ""
        if words and words[0] == "analysis":
            self._open("reasoning", "")
        elif recipient.startswith("functions."):
            self._open("call", recipient)
        else:
            self._open("content", "")

    def _open(self, kind: str, recipient: str) -> None:
        self._in_body, self._kind, self._recipient, self._body = True, kind, recipient, ""

    def _text(self, text: str) -> Split:
        if self._kind == "reasoning":
            return Split(reasoning=text)
        if self._kind == "content":
            return self._content(text)
        self._body += text
        return Split()

    def _content(self, text: str) -> Split:
        if self._calls is None:
            return Split(content=text)
        content, calls = self._calls.feed(text)
        return Split(content=content, calls=calls)

    def _close(self) -> Split:
        self._in_body = False
        if self._kind != "call":
            return Split()
        name = self._recipient.removeprefix("functions.")
        return Split(calls=[call_from_arguments(name, self._body)])
