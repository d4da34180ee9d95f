"""Raw model output as the engine sends it: split into content, reasoning and tool calls
(ollm.reasoning), for the translator tests that start from model text."""

from __future__ import annotations

from typing import Any

from ollm.generation import FinalEvent, TokenEvent
from ollm.reasoning import OutputSplitter, Split, TaggedParser


def _event(split: Split) -> TokenEvent:
    return TokenEvent(text=split.content, reasoning=split.reasoning, tool_calls=split.calls)


def token_events(pieces: list[str], thinking: bool = False) -> list[TokenEvent]:
    """The TokenEvents the engine emits for model output arriving in ``pieces``."""
    splitter = OutputSplitter(TaggedParser(thinking=thinking, tools=True))
    splits = [splitter.feed(piece) for piece in pieces] + [splitter.finish()]
    return [_event(split) for split in splits if split]


def split_final(text: str, thinking: bool = False, tools: bool = True, **fields: Any) -> FinalEvent:
    """The FinalEvent the engine sends after generating ``text`` (``tools``: the request offered some)."""
    splitter = OutputSplitter(TaggedParser(thinking=thinking, tools=tools))
    splitter.feed(text)
    splitter.finish()
    return FinalEvent.model_validate(
        {"text": splitter.content, "reasoning": splitter.total.reasoning, "tool_calls": splitter.total.calls, **fields}
    )
