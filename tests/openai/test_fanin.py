"""The fan-in relay over several job streams, with stand-in streams (no Redis)."""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from typing import Any, cast

from ollm.generation import ErrorEvent, Event, FinalEvent, Timings, TokenEvent, Usage
from server.dispatch import JobStream
from server.openai.fanin import _relay


class FakeStream:
    def __init__(self, events: list[Event], delay: float) -> None:
        self.events = events
        self.delay = delay
        self.closed = False

    async def next_event(self) -> Event:
        await asyncio.sleep(self.delay)
        return self.events.pop(0)

    async def close(self) -> None:
        self.closed = True


def final(text: str) -> FinalEvent:
    return FinalEvent(finish_reason="stop", text=text, usage=Usage(completion_tokens=len(text)), timings=Timings())


def run(streams: list[FakeStream], firsts: list[Event]) -> tuple[list[str], dict[int, FinalEvent]]:
    seen: dict[int, FinalEvent] = {}

    def frames(index: int, event: Event) -> Iterable[str]:
        return [f"{index}:{getattr(event, 'text', None) or getattr(event, 'message', '')}"]

    def tail(finals: dict[int, FinalEvent]) -> list[str]:
        seen.update(finals)
        return ["done"]

    async def collect() -> list[str]:
        relay = _relay(cast(list[JobStream], streams), firsts, frames, ["head"], tail)
        return [frame async for frame in relay]

    return asyncio.run(collect()), seen


def test_choices_interleave_and_all_finish() -> None:
    slow = FakeStream([TokenEvent(text="b"), final("ab")], delay=0.02)
    fast = FakeStream([final("x")], delay=0.0)
    out, finals = run([slow, fast], [TokenEvent(text="a"), TokenEvent(text="x")])
    assert out[0] == "head" and out[-1] == "done"
    assert [f for f in out if f.startswith("0:")] == ["0:a", "0:b", "0:ab"]
    assert [f for f in out if f.startswith("1:")] == ["1:x", "1:x"]
    assert out.index("1:x") < out.index("0:b")  # arrival order, not choice order
    assert set(finals) == {0, 1} and slow.closed and fast.closed


def test_an_error_ends_every_choice() -> None:
    hanging: Any = FakeStream([TokenEvent(text="never")], delay=60)
    failing = FakeStream([ErrorEvent(message="worker died", status=503)], delay=0.0)
    out, finals = run([hanging, failing], [TokenEvent(text="a"), TokenEvent(text="b")])
    assert "1:worker died" in out and out[-1] == "done" and finals == {}
    assert hanging.closed and failing.closed  # the still-running job is cancelled too
