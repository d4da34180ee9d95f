"""Workers' keep-alive (workers/keep_alive.py, over workers/residency.py) over fakeredis with a fake
engine: idle models are unloaded when their keep-alive runs out, reloaded on use, and reported for
/api/ps."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator

import fakeredis
import pytest

from ollm.contract import KeepAlive, Keys
from ollm.engine.base import EventSink
from ollm.generation import ExecutionInfo, FinalEvent, GenerationRequest, Timings, Usage
from tests.integration.harness import wait_until
from workers.keep_alive import KeepAliveSweeper
from workers.residency import Residency
from workers.resident import Resident, ResidentEngine

KEYS = Keys("t")


class FakeEngine:
    """Finishes a request when told to, so a test can hold one in flight."""

    loads = 0

    def __init__(self) -> None:
        FakeEngine.loads += 1
        self.info = ExecutionInfo(model="m", backend="fake", specialization_state="none", device="cpu", dtype="f32")
        self.closed = False
        self.sinks: list[EventSink] = []

    def submit(self, request: GenerationRequest, sink: EventSink) -> None:
        self.sinks.append(sink)

    def finish_all(self) -> None:
        for sink in self.sinks:
            sink(FinalEvent(finish_reason="stop", text="", usage=Usage(), timings=Timings()))
        self.sinks.clear()

    def cancel(self, request_id: str) -> None:
        pass

    def ready(self) -> bool:
        return True

    def active(self) -> int:
        return len(self.sinks)

    def close(self) -> None:
        self.closed = True


@pytest.fixture
def redis_client() -> Iterator[fakeredis.FakeRedis]:
    client = fakeredis.FakeRedis()
    yield client
    client.close()


def residency_with(
    redis_client: fakeredis.FakeRedis,
) -> tuple[KeepAliveSweeper, Resident[FakeEngine], ResidentEngine]:
    resident: Resident[FakeEngine] = Resident(["m", "org/m"], FakeEngine, FakeEngine(), size=123)
    sweeper = KeepAliveSweeper(Residency(redis_client, KEYS, [resident]), redis_client, KEYS)
    engine = ResidentEngine(resident)  # type: ignore[arg-type]
    return sweeper, resident, engine


def set_keep_alive(redis_client: fakeredis.FakeRedis, name: str, seconds: float | None, stamp: str) -> None:
    redis_client.set(KEYS.keep_alive(name), KeepAlive(seconds, stamp).dumps())


def loaded(redis_client: fakeredis.FakeRedis, residency: KeepAliveSweeper) -> dict[str, dict[str, object]]:
    raw: dict[bytes, bytes] = redis_client.hgetall(residency.loaded_key)  # type: ignore[assignment]
    return {k.decode(): json.loads(v) for k, v in raw.items()}


def request() -> GenerationRequest:
    return GenerationRequest(model="m", prompt="x")


def test_kept_forever_without_a_client_keep_alive(redis_client: fakeredis.FakeRedis) -> None:
    residency, resident, _ = residency_with(redis_client)
    residency.sweep()
    assert resident.model is not None
    assert loaded(redis_client, residency)["m"] == {
        "names": ["m", "org/m"], "size": 123, "loaded_at": resident.loaded_at, "expires_at": None,
        "last_used": resident.last_used, "in_flight": 0, "pinned": True,
    }  # fmt: skip


def test_keep_alive_zero_unloads_when_idle_and_the_next_request_reloads(redis_client: fakeredis.FakeRedis) -> None:
    residency, resident, engine = residency_with(redis_client)
    first = resident.model
    assert first is not None
    engine.submit(request(), lambda event: None)
    set_keep_alive(redis_client, "org/m", 0, "0001")  # any of the served names counts
    residency.sweep()
    assert resident.model is first, "a model with a request in flight stays"
    first.finish_all()
    residency.sweep()
    assert resident.model is None and first.closed and loaded(redis_client, residency) == {}

    loads = FakeEngine.loads
    engine.submit(request(), lambda event: None)
    assert resident.model is not None and FakeEngine.loads == loads + 1
    resident.model.finish_all()
    # The keep-alive that unloaded the model is spent: a reload by a request that set none stays.
    residency.sweep()
    assert resident.model is not None and loaded(redis_client, residency)["m"]["expires_at"] is None
    # A new choice applies again.
    set_keep_alive(redis_client, "m", 0, "0002")
    residency.sweep()
    assert resident.model is None


def test_expiry_counts_from_the_last_request(redis_client: fakeredis.FakeRedis) -> None:
    residency, resident, engine = residency_with(redis_client)
    set_keep_alive(redis_client, "m", 60, "0001")
    engine.submit(request(), lambda event: None)
    assert resident.model is not None
    resident.model.finish_all()
    residency.sweep()
    report = loaded(redis_client, residency)["m"]
    assert report["expires_at"] == pytest.approx(resident.last_used + 60)
    resident.last_used -= 61
    residency.sweep()
    assert resident.model is None


def test_load_requests_load_at_once(redis_client: fakeredis.FakeRedis) -> None:
    residency, resident, _ = residency_with(redis_client)
    set_keep_alive(redis_client, "m", 0, "0001")
    residency.sweep()
    assert resident.model is None
    set_keep_alive(redis_client, "m", 30, "0002")
    residency.sweep([("org/m", "load")])  # the load runs on a thread of its own
    wait_until(lambda: resident.model is not None, 10, "the requested load")
    residency.sweep()
    assert "m" in loaded(redis_client, residency)


def test_the_thread_reads_the_residency_channel(redis_client: fakeredis.FakeRedis) -> None:
    residency, resident, _ = residency_with(redis_client)
    set_keep_alive(redis_client, "m", 0, "0001")
    residency.start()
    try:
        unloaded = threading.Event()
        for _ in range(50):
            if resident.model is None:
                unloaded.set()
                break
            redis_client.publish(KEYS.residency_channel, json.dumps({"model": "m", "action": "unload"}))
            threading.Event().wait(0.1)
        assert unloaded.is_set()
    finally:
        residency.stop()
    assert redis_client.exists(residency.loaded_key) == 0
