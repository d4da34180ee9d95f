"""Where a load goes, and what a derived model changes in a request: the pure rules, no processes."""

from __future__ import annotations

import asyncio

import fakeredis
import pytest
import redis

from ollm.contract import Keys, LoadedModel, LoadRequest, WorkerInfo
from ollm.derived import DerivedModel, apply
from ollm.errors import ServiceUnavailableError
from ollm.generation import ChatMessage, GenerationRequest
from ollm.sampling_defaults import sampling_params
from ollm.settings import GenerationSettings, Settings
from server.scheduler import Scheduler, Weights, candidates, choose, too_large

MB = 1 << 20
KEYS = Keys("place")


def worker(name: str, budget: int, used: int = 0, models: list[str] | None = None, **extra: object) -> WorkerInfo:
    return WorkerInfo.model_validate(
        {"name": name, "host": "h", "pid": 1, "models": models or [], "on_demand": True,
         "memory_budget": budget, "memory_used": used, **extra}
    )  # fmt: skip


def weights(size: int) -> Weights:
    """Weight files that take ``size`` bytes once loaded (in the dtype they are stored in)."""
    return Weights(round(size / 1.1), "float32")


def held(size: int, pinned: bool = False, in_flight: int = 0) -> LoadedModel:
    return LoadedModel(names=["m"], size=size, pinned=pinned, in_flight=in_flight)


def test_a_worker_with_room_now_is_preferred_over_one_that_must_evict() -> None:
    full = worker("full", 1000 * MB, used=900 * MB)
    roomy = worker("roomy", 1000 * MB, used=100 * MB)
    found = candidates([full, roomy], [{"a": held(900 * MB)}, {"b": held(100 * MB)}], "new", weights(500 * MB))
    chosen = choose(found)
    assert chosen is not None and chosen.worker.name == "roomy"


def test_when_nobody_has_room_the_worker_that_frees_most_by_evicting_idle_models_loads() -> None:
    busy = worker("busy", 1000 * MB, used=900 * MB)
    idle = worker("idle", 1000 * MB, used=900 * MB)
    loaded = [{"a": held(900 * MB, in_flight=2)}, {"b": held(900 * MB)}]
    found = candidates([busy, idle], loaded, "new", weights(500 * MB))
    chosen = choose(found)
    assert chosen is not None and chosen.worker.name == "idle"
    # A replica never evicts anything.
    assert choose(found, replica=True) is None


def test_pinned_models_and_workers_that_hold_the_model_or_do_not_load_on_demand_are_left_out() -> None:
    pinned = worker("pinned", 1000 * MB, used=800 * MB)
    holder = worker("holder", 10_000 * MB, models=["new"])
    fixed = worker("fixed", 10_000 * MB, on_demand=False)
    found = candidates([pinned, holder, fixed], [{"a": held(800 * MB, pinned=True)}, {}, {}], "new", weights(500 * MB))
    assert [c.worker.name for c in found] == ["pinned"]
    assert choose(found) is None  # only evicting the pinned model would make room
    message = too_large("new", found)
    assert "'new' needs about 0.49 GiB" in message and "pinned 0.98 GiB (0.78 GiB pinned)" in message


def test_max_loaded_models_counts_as_no_room_now() -> None:
    capped = worker("capped", 0, max_loaded_models=1)
    found = candidates([capped], [{"a": held(1)}], "new", weights(1))
    assert found[0].slots is False
    chosen = choose(found)
    assert chosen is not None and chosen.worker.name == "capped"  # it can evict the idle one


def test_a_model_is_sized_in_the_dtype_each_worker_runs_it_in() -> None:
    stored_bf16 = Weights(100 * MB, "bfloat16")
    cpu = worker("cpu", 0, dtype="float32")
    gpu = worker("gpu", 0, dtype="bfloat16")
    assert stored_bf16.on(cpu) == 2 * stored_bf16.on(gpu) == round(2 * 100 * MB * 1.1)


def test_a_derived_model_applies_its_system_prompt_and_only_the_parameters_the_client_left_open() -> None:
    derived = DerivedModel(name="pirate", base="smol", system="Arr.", parameters={"num_predict": 5, "temperature": 0})
    chosen = sampling_params(GenerationSettings(), temperature=0.9)
    request = GenerationRequest(model="pirate", messages=[ChatMessage(role="user", content="hi")], sampling=chosen)
    resolved = apply(request, derived)
    assert resolved.model == "smol"
    assert [(m.role, m.content) for m in resolved.messages or []] == [("system", "Arr."), ("user", "hi")]
    assert resolved.sampling.max_new_tokens == 5 and resolved.sampling.temperature == 0.9
    # The request's own system message replaces the derived one; a raw prompt gets none.
    own = request.model_copy(update={"messages": [ChatMessage(role="system", content="Be brief."), *request.messages]})
    assert [m.content for m in apply(own, derived).messages or []] == ["Be brief.", "hi"]
    raw = apply(GenerationRequest(model="pirate", prompt="x"), derived)
    assert raw.prompt == "x" and raw.messages is None and raw.sampling.max_new_tokens == 5


def test_a_draining_worker_is_never_a_candidate() -> None:
    """A stopping worker advertises no models yet still beats: it would take the load and never run it."""
    stopping = worker("stopping", 10_000 * MB, draining=True)
    found = candidates([stopping, worker("up", 1000 * MB)], [{}, {}], "new", weights(500 * MB))
    assert [c.worker.name for c in found] == ["up"]


def scheduler_on(server: fakeredis.FakeServer) -> Scheduler:
    settings = Settings()
    return Scheduler(settings, fakeredis.FakeRedis(server=server), fakeredis.FakeAsyncRedis(server=server), KEYS)


def test_a_claim_on_a_worker_that_started_draining_moves_and_the_requests_keep_waiting(
    clean_settings_env: object,
) -> None:
    server = fakeredis.FakeServer()
    scheduler = scheduler_on(server)
    first, second = worker("first", 10_000 * MB), worker("second", 10_000 * MB)

    async def scenario() -> tuple[dict[str, object] | None, str, str]:
        await scheduler.place("echo", [first, second])
        claim = LoadRequest.model_validate_json(await scheduler.connection.get(KEYS.load_claim("echo")))
        other = second if claim.worker == "first" else first
        ending = await scheduler.waiting("echo", [worker(claim.worker, 10_000 * MB, draining=True), other])
        moved = LoadRequest.model_validate_json(await scheduler.connection.get(KEYS.load_claim("echo")))
        return ending, moved.worker, other.name

    ending, moved_to, other = asyncio.run(scenario())
    assert ending is None, "nothing was lost: the requests wait for the load on the other worker"
    assert moved_to == other
    assert fakeredis.FakeRedis(server=server).llen(f"rq:queue:{KEYS.worker_queue(other)}") == 1


def test_a_load_that_cannot_be_enqueued_drops_its_claim_at_once(
    clean_settings_env: object, monkeypatch: pytest.MonkeyPatch
) -> None:
    scheduler = scheduler_on(fakeredis.FakeServer())

    def refused(request: LoadRequest) -> None:
        raise redis.ConnectionError("Redis went away")

    monkeypatch.setattr(scheduler, "_enqueue_load", refused)

    async def scenario() -> bytes | None:
        with pytest.raises(ServiceUnavailableError, match="could not place the load"):
            await scheduler.place("echo", [worker("w", 10_000 * MB)])
        claim: bytes | None = await scheduler.connection.get(KEYS.load_claim("echo"))
        return claim

    assert asyncio.run(scenario()) is None


def test_a_load_that_ended_between_the_workers_read_and_the_claim_is_not_placed_again(
    clean_settings_env: object, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The caller read the workers before the load ended; the loading worker then announced the model
    and released its claim. Placing on that stale read would load the model a second time."""
    server = fakeredis.FakeServer()
    scheduler = scheduler_on(server)
    stale = worker("w", 10_000 * MB)

    async def now_serving(*args: object) -> list[WorkerInfo]:
        return [worker("w", 10_000 * MB, models=["echo"])]

    monkeypatch.setattr("server.scheduler.live_workers", now_serving)

    async def scenario() -> bytes | None:
        await scheduler.place("echo", [stale])
        claim: bytes | None = await scheduler.connection.get(KEYS.load_claim("echo"))
        return claim

    assert asyncio.run(scenario()) is None
    assert fakeredis.FakeRedis(server=server).llen(f"rq:queue:{KEYS.worker_queue('w')}") == 0
