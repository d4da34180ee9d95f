"""Torch work runs on threads that end with it (ollm/engine/threads.py), and full-attention KV grows
in place (ollm/engine/slack_layer.py)."""

from __future__ import annotations

import gc
import threading
import time
import weakref
from pathlib import Path

import pytest
import torch
from transformers.cache_utils import DynamicLayer

from ollm.engine import threads
from ollm.engine.base import stream
from ollm.engine.slack_layer import SlackLayer
from ollm.generation import FinalEvent, GenerationRequest, SamplingParams
from ollm.memory import FULL_ATTENTION_SLACK
from ollm.settings import load_settings
from tests.conftest import DEFAULT_CHAT_MODEL
from workers.engines import load_models


def _named(name: str) -> list[threading.Thread]:
    return [thread for thread in threading.enumerate() if thread.name == name]


def test_on_fresh_thread_returns_or_raises_and_leaves_no_thread() -> None:
    seen: list[str] = []

    def work() -> int:
        seen.append(threading.current_thread().name)
        return 7

    assert threads.on_fresh_thread(work, name="ollm-test-work") == 7
    assert seen == ["ollm-test-work"] and not _named("ollm-test-work")
    with pytest.raises(ValueError, match="bad"):
        threads.on_fresh_thread(lambda: int("bad"), name="ollm-test-work")


def test_an_idle_loop_ends_its_thread_and_the_next_work_starts_one(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(threads, "IDLE_SECONDS", 0.05)
    work: list[int] = []
    done: list[int] = []

    def step() -> bool:
        if not work:
            return False
        done.append(work.pop())
        return True

    loop = threads.IdleEndingThread(step, lambda: not work, name="ollm-test-loop")
    try:
        deadline = time.monotonic() + 5
        while _named("ollm-test-loop") and time.monotonic() < deadline:
            time.sleep(0.01)
        assert not _named("ollm-test-loop")  # nothing to do: the thread ended
        for item in range(3):
            work.append(item)
            loop.wake()
        deadline = time.monotonic() + 5
        while len(done) < 3 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert sorted(done) == [0, 1, 2]
    finally:
        loop.close()
    assert not _named("ollm-test-loop")


def test_the_engine_thread_ends_when_idle_and_answers_after(
    default_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(threads, "IDLE_SECONDS", 0.2)
    settings = load_settings(
        {"runtime": {"models_dir": default_model_dir.parent, "dtype": "float32"}, "worker": {"max_batch": 4}}
    )
    engines, _ = load_models([DEFAULT_CHAT_MODEL], settings)
    # The load ran on a thread of its own, which is gone: its OpenMP pool with it.
    assert not _named("ollm-load-models")
    engine = engines[DEFAULT_CHAT_MODEL]
    request = GenerationRequest(
        model=DEFAULT_CHAT_MODEL, prompt="Hello", sampling=SamplingParams(temperature=0.0, max_new_tokens=4)
    )
    try:
        first = list(stream(engine, request))[-1]
        deadline = time.monotonic() + 10
        while _named("ollm-engine") and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not _named("ollm-engine")
        again = list(stream(engine, request.model_copy(update={"id": "again"})))[-1]
        assert isinstance(first, FinalEvent) and isinstance(again, FinalEvent)
        assert again.text == first.text
    finally:
        model = weakref.ref(engine.runner.model)  # type: ignore[attr-defined]
        engine.close()
    # Closed, the engine holds no cycle with its loop: the model goes with its last holder, without
    # waiting for a garbage collection (the worker's unload measures the memory given back).
    gc.disable()
    try:
        del engine, engines
        assert model() is None
    finally:
        gc.enable()


def test_a_slack_layer_returns_what_concatenation_does_and_moves_once_per_slack() -> None:
    torch.manual_seed(0)
    slack, plain = SlackLayer(), DynamicLayer()
    rooms = set()
    for step in range(2 * FULL_ATTENTION_SLACK + 5):
        columns = 7 if step == 0 else 1  # a prefill, then decode steps
        keys, values = torch.randn(2, 3, columns, 4), torch.randn(2, 3, columns, 4)
        got, want = slack.update(keys, values), plain.update(keys, values)
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
        rooms.add(got[0].untyped_storage().data_ptr())
    # 7 + 2*FULL_ATTENTION_SLACK + 4 columns written: the first room and two moves, not one copy per step.
    assert len(rooms) == 3
    # A join or a trim hands it exact tensors: the room is freed and the next update makes a new one.
    slack.replace(want[0][:1], want[1][:1])
    assert slack.room_bytes() == want[0][:1].nbytes + want[1][:1].nbytes
    keys = torch.randn(1, 3, 1, 4)
    assert torch.equal(slack.update(keys, keys)[0][:, :, -1:], keys)
    assert slack.room_bytes() == 2 * (want[0].shape[2] + 1 + FULL_ATTENTION_SLACK) * 3 * 4 * 4
