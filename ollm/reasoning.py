"""Splitting a model's output, as it streams, into reasoning, answer content and tool calls.

Done once, in the engine, for every API family: each TokenEvent already says which of its text is
thinking and which is answer, and which tool calls completed (ollm.generation). Two formats are
read here: ``<think>...</think>`` (Qwen3-style thinking templates) around the Hermes
``<tool_call>`` markup (ollm.tools); gpt-oss's harmony channels are read by ollm.harmony.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

from ollm.generation import ToolCall
from ollm.tools import ToolCallParser, partial_suffix

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"


def thinking_template(template: str | None) -> bool:
    """A Qwen3-style template whose model thinks in <think> tags."""
    return bool(template) and THINK_OPEN in str(template) and THINK_CLOSE in str(template)


@dataclass
class Split:
    """What a piece of model output was: reasoning, answer content and completed tool calls."""

    reasoning: str = ""
    content: str = ""
    calls: list[ToolCall] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.reasoning or self.content or self.calls)

    def add(self, other: Split) -> Split:
        self.reasoning += other.reasoning
        self.content += other.content
        self.calls += other.calls
        return self


class OutputParser(Protocol):
    @property
    def reasoning_open(self) -> bool:
        """Whether the output is inside reasoning now (a reasoning budget counts these tokens)."""
        ...

    def feed(self, text: str, special: bool = False) -> Split: ...

    def finish(self) -> Split:
        """The output ended: what was held back, and any call cut short (as a partial call)."""
        ...


class TaggedParser:
    """``<think>`` reasoning (for thinking templates) and ``<tool_call>`` calls (when tools were offered).

    ``in_reasoning``: the prompt already opened ``<think>`` (templates that start the answer in
    thought). Text that may be the start of a tag is held back until it is clearly not.
    """

    def __init__(self, thinking: bool, tools: bool, in_reasoning: bool = False) -> None:
        self._thinking = thinking
        self._calls = ToolCallParser() if tools else None
        self._in_reasoning = in_reasoning
        self._buffer = ""
        # Thinking templates put a blank line after </think>; it is not part of the answer.
        self._strip = False

    @property
    def reasoning_open(self) -> bool:
        return self._in_reasoning

    def feed(self, text: str, special: bool = False) -> Split:
        if not self._thinking:
            return self._content(text)
        self._buffer += text
        out = Split()
        while True:
            tag = THINK_CLOSE if self._in_reasoning else THINK_OPEN
            found = self._buffer.find(tag)
            if found < 0:
                hold = partial_suffix(self._buffer, tag)
                ready, self._buffer = self._buffer[: len(self._buffer) - hold], self._buffer[len(self._buffer) - hold :]
                return out.add(self._piece(ready))
            out.add(self._piece(self._buffer[:found]))
            self._buffer = self._buffer[found + len(tag) :]
            self._in_reasoning = not self._in_reasoning
            self._strip = not self._in_reasoning

    def finish(self) -> Split:
        rest, self._buffer = self._buffer, ""
        out = self._piece(rest)
        if self._calls is not None:
            content, calls = self._calls.finish()
            out.add(Split(content=content, calls=calls))
        return out

    def _piece(self, text: str) -> Split:
        return Split(reasoning=text) if self._in_reasoning else self._content(text)

    def _content(self, text: str) -> Split:
        if self._strip:
            text = text.lstrip()
            self._strip = not text
        if self._calls is None:
            return Split(content=text)
        content, calls = self._calls.feed(text)
        return Split(content=content, calls=calls)


class OutputSplitter:
    """One request's output through its parser: the deltas of each step, and the whole at the end."""

    def __init__(self, parser: OutputParser) -> None:
        self.parser = parser
        self.total = Split()

    def feed(self, text: str, special: bool = False) -> Split:
        return self._keep(self.parser.feed(text, special))

    def finish(self) -> Split:
        return self._keep(self.parser.finish())

    def _keep(self, split: Split) -> Split:
        self.total.add(Split(split.reasoning, split.content, list(split.calls)))
        return split

    @property
    def content(self) -> str:
        """The answer: stripped of the whitespace around calls when the model made any."""
        return self.total.content.strip() if self.total.calls else self.total.content
