"""The worker's residency manager under concurrency (workers/residency.py): the heartbeat never
waits on a load, and loads, reloads, acquires, keep-alive sweeps and evictions running at once all
finish (the lock order in the module's docstring), with the budget held throughout.

Models here are test doubles that load instantly or when told to: what is tested is the locking
and the budget arithmetic, not a model. tests/integration/test_slow_loads.py loads a real model
on a real worker."""

from __future__ import annotations

import random
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import fakeredis
import pytest
import torch

from ollm.contract import KeepAlive, Keys, parse_worker
from ollm.errors import ServiceUnavailableError
from ollm.generation import ExecutionInfo
from ollm.settings import Settings
from tests.integration.harness import wait_until
from workers.keep_alive import KeepAliveSweeper
from workers.residency import Residency
from workers.resident import Resident

KEYS = Keys("res")
SIZE = 100


class Model:
    """A loaded model: a real torch module (so a load's progress has tensors to count)."""

    def __init__(self) -> None:
        self.module = torch.nn.Linear(4, 4)
        self.info = ExecutionInfo(model="m", backend="fake", specialization_state="none", device="cpu", dtype="f32")
        self.closed = False

    def active(self) -> int:
        return 0

    def close(self) -> None:
        self.closed = True


@dataclass
class Plan:
    """The two things the residency reads of a plan before loading."""

    resolved_reference: str
    path: Path | None = None
    dtype: str = "float32"

    def expected_peak_bytes(self) -> int:
        return SIZE


@pytest.fixture
def fake_loading(monkeypatch: pytest.MonkeyPatch) -> dict[str, threading.Event]:
    """Plans and loads of test doubles; a load whose name has a gate here waits for it."""
    gates: dict[str, threading.Event] = {}

    def load_models(references: list[str], settings: Settings) -> tuple[dict[str, Any], dict[str, Any]]:
        (name,) = references
        if name in gates:
            assert gates[name].wait(30), "the test never opened the gate"
        return {name: Model()}, {}

    monkeypatch.setattr("workers.residency.plan_for", lambda reference, settings: Plan(reference))
    monkeypatch.setattr("workers.engines.load_models", load_models)
    monkeypatch.setattr("workers.residency.resident_bytes", lambda model: None)
    # A full gc.collect per unload (outside every lock) costs a second here under load and tests
    # nothing about locking.
    monkeypatch.setattr("workers.residency._free_memory", lambda: None)
    return gates


@pytest.fixture
def redis_client() -> Iterator[fakeredis.FakeRedis]:
    client = fakeredis.FakeRedis()
    yield client
    client.close()


def test_the_heartbeat_reports_a_load_while_it_runs(
    fake_loading: dict[str, threading.Event], redis_client: fakeredis.FakeRedis, clean_settings_env: Path
) -> None:
    residency = Residency(redis_client, KEYS, [], budget=10 * SIZE, settings=Settings())
    gate = fake_loading["slow"] = threading.Event()
    loader = threading.Thread(target=residency.load, args=("slow", float("inf")))
    loader.start()
    try:
        # Beats go on while the load waits: each status() returns with the load under way and
        # its room reserved.
        status = wait_until(lambda: (s := residency.status())["loading"] and s, 10, "the load to be reported")
        info = parse_worker({"name": "w", **status}, pttl=30_000)
        assert info.loading is not None and info.loading.model == "slow"
        assert info.memory_used == SIZE and info.models == []
        assert loader.is_alive()
    finally:
        gate.set()
        loader.join(timeout=30)
    status = residency.status()
    assert status["loading"] == "" and "slow" in str(status["models"]) and status["memory_used"] == SIZE


def test_a_failed_load_gives_its_room_back(
    monkeypatch: pytest.MonkeyPatch, redis_client: fakeredis.FakeRedis, clean_settings_env: Path
) -> None:
    def broken(references: list[str], settings: Settings) -> Any:
        raise RuntimeError("truncated checkpoint")

    monkeypatch.setattr("workers.residency.plan_for", lambda reference, settings: Plan(reference))
    monkeypatch.setattr("workers.engines.load_models", broken)
    residency = Residency(redis_client, KEYS, [], budget=10 * SIZE, settings=Settings())
    with pytest.raises(RuntimeError, match="truncated"):
        residency.load("broken", float("inf"))
    assert residency.status()["loading"] == "" and residency.used() == 0


def test_a_load_counts_the_tensors_it_puts_in_place(redis_client: fakeredis.FakeRedis) -> None:
    """Through torch's registration hooks, as a real from_pretrained sets its weights."""
    linear = torch.nn.Linear(8, 8)
    resident: Resident[Any] = Resident(["m"], lambda: torch.nn.Linear(8, 8), linear, size=SIZE)
    residency = Residency(redis_client, KEYS, [resident])
    assert resident.detach(None) is linear
    seen: list[int] = []
    hook = torch.nn.modules.module.register_module_parameter_registration_hook(
        lambda module, name, param: seen.append(residency._load.info().bytes_read) if residency._load else None
    )
    try:
        resident.acquire()
    finally:
        hook.remove()
    resident.release()
    # weight (8x8) then bias (8), float32: the progress grew as each arrived.
    assert seen == [0, 8 * 8 * 4] and resident.model is not None


def test_loads_reloads_acquires_sweeps_and_evictions_at_once_all_finish(
    fake_loading: dict[str, threading.Event], redis_client: fakeredis.FakeRedis, clean_settings_env: Path
) -> None:
    budget = 2 * SIZE + SIZE // 2  # two models fit, a third must evict one
    residency = Residency(redis_client, KEYS, [], budget=budget, max_loaded=2, settings=Settings())
    pinned: Resident[Any] = Resident(["pinned"], Model, Model(), size=SIZE // 2)
    residency._add(pinned)
    sweeper = KeepAliveSweeper(residency, redis_client, KEYS)
    names = [f"m{i}" for i in range(5)]
    rounds = 100
    over_budget: list[dict[str, Any]] = []
    errors: list[BaseException] = []

    def guarded(work: Any) -> Any:
        def run(seed: int) -> None:
            rng = random.Random(seed)
            try:
                for _ in range(rounds):
                    work(rng)
            except BaseException as exc:  # the assertion below names it
                errors.append(exc)

        return run

    def load(rng: random.Random) -> None:
        try:
            resident, _ = residency.load(rng.choice(names), deadline=0.0)
            resident.acquire()
            resident.release()
        except ServiceUnavailableError:
            pass  # no room at once (deadline passed) or evicted meanwhile: a refusal, not a hang

    def reload_pinned(rng: random.Random) -> None:
        pinned.acquire()
        pinned.release()

    def evict(rng: random.Random) -> None:
        held = residency.held()
        if held:
            residency.drop(rng.choice(held), None)

    def sweep(rng: random.Random) -> None:
        redis_client.set(KEYS.keep_alive("pinned"), KeepAlive(0, str(rng.random())).dumps())
        sweeper.sweep()

    def beat(rng: random.Random) -> None:
        status = residency.status()
        if int(status["memory_used"]) > budget:
            over_budget.append(status)

    threads = [
        threading.Thread(target=guarded(work), args=(seed,), daemon=True)
        for seed, work in enumerate([load, load, reload_pinned, evict, sweep, beat, beat])
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert not [t for t in threads if t.is_alive()], "a thread never finished: a deadlock"
    assert errors == [] and over_budget == []
    assert residency.loads >= len(names), "the loads ran (and so did the evictions that made room for them)"
