"""The echo engine honours the Engine protocol: many requests, limits, stop strings, cancel."""

from __future__ import annotations

import os
import queue
import subprocess
import sys
from pathlib import Path

from ollm.engine.base import stream
from ollm.engine.echo import EchoEngine
from ollm.generation import (
    ChatMessage,
    ErrorEvent,
    Event,
    FinalEvent,
    GenerationRequest,
    SamplingParams,
    TokenEvent,
)


def request(text: str, **sampling: object) -> GenerationRequest:
    return GenerationRequest(
        model="echo",
        messages=[ChatMessage(role="system", content="ignored"), ChatMessage(role="user", content=text)],
        sampling=SamplingParams.model_validate(sampling),
    )


def test_echoes_the_last_user_message_word_by_word() -> None:
    engine = EchoEngine(token_delay=0)
    events = list(stream(engine, request("one two  three")))
    engine.close()
    assert [e.text for e in events if isinstance(e, TokenEvent)] == ["one", " two", "  three"]
    final = events[-1]
    assert isinstance(final, FinalEvent) and final.text == "one two  three" and final.finish_reason == "stop"
    assert final.usage.prompt_tokens == 4 and final.usage.completion_tokens == 3


def test_max_new_tokens_and_stop_strings() -> None:
    engine = EchoEngine(token_delay=0)
    limited = list(stream(engine, request("a b c d", max_new_tokens=2)))[-1]
    stopped = list(stream(engine, request("a b. c d", stop=["."])))[-1]
    engine.close()
    assert isinstance(limited, FinalEvent) and (limited.text, limited.finish_reason) == ("a b", "length")
    assert isinstance(stopped, FinalEvent) and (stopped.text, stopped.finish_reason) == ("a b", "stop")
    assert stopped.stop_sequence == "."


def test_cancel_ends_a_request_within_a_token() -> None:
    engine = EchoEngine(token_delay=0.01)
    events: queue.Queue[Event] = queue.Queue()
    long = request(" ".join(["w"] * 500))
    engine.submit(long, events.put)
    assert isinstance(events.get(timeout=2), TokenEvent)
    engine.cancel(long.id)
    while not isinstance(event := events.get(timeout=2), FinalEvent):
        pass
    engine.close()
    assert event.finish_reason == "cancelled" and event.usage.completion_tokens < 10


def test_requests_in_flight_advance_together() -> None:
    engine = EchoEngine(token_delay=0.01)
    order: queue.Queue[tuple[int, Event]] = queue.Queue()
    for index in range(10):
        engine.submit(request(" ".join(["w"] * 20)), lambda e, i=index: order.put((i, e)))
    events: list[tuple[int, Event]] = []
    while sum(isinstance(e, FinalEvent) for _, e in events) < 10:
        events.append(order.get(timeout=5))
    engine.close()
    assert all(e.usage.completion_tokens == 20 for _, e in events if isinstance(e, FinalEvent))
    # Served one after another, the second request's first token would follow the first's end.
    first_final = next(n for n, (_, e) in enumerate(events) if isinstance(e, FinalEvent))
    assert {i for i, e in events[:first_final] if isinstance(e, TokenEvent)} == set(range(10))


def test_one_failing_request_does_not_end_the_engine_for_the_others() -> None:
    engine = EchoEngine(token_delay=0)
    failed: queue.Queue[Event] = queue.Queue()

    def refusing_sink(event: Event) -> None:
        if isinstance(event, TokenEvent):
            raise RuntimeError("the consumer broke")
        failed.put(event)

    engine.submit(request("doomed words"), refusing_sink)
    assert isinstance(failed.get(timeout=5), ErrorEvent)
    # Text no UTF-8 encoder takes (a lone surrogate) is echoed, not fatal.
    events = list(stream(engine, request("\ud800 still here")))
    engine.close()
    assert isinstance(events[-1], FinalEvent) and events[-1].text == "\ud800 still here"


def test_an_echo_worker_loads_its_model_without_torch() -> None:
    # What `ollm worker --model echo` does before it registers, with an explicit CPU device: the
    # pipeline tests start many such workers, and torch's import is seconds of each start.
    code = """
import sys
from ollm.devices import resolve_device, resolve_dtype
from ollm.settings import Settings
from workers.engines import load_models
from workers.memory import default_budget, resident_bytes
settings = Settings.model_validate({"runtime": {"device": "cpu"}})
device = resolve_device(settings.runtime.device)
default_budget(device)
resolve_dtype(settings.runtime.dtype, device)
engines, _ = load_models(["echo"], settings)
assert resident_bytes(engines["echo"]) is None
heavy = sorted({"torch", "transformers"} & set(sys.modules))
assert not heavy, heavy
"""
    env = {k: v for k, v in os.environ.items() if not k.startswith("OLLM_")} | {"OLLM_CONFIG_FILE": os.devnull}
    repo = Path(__file__).resolve().parents[1]
    run = subprocess.run([sys.executable, "-c", code], cwd=repo, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
