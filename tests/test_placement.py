"""Where a load goes, and what a derived model changes in a request: the pure rules, no processes."""

from __future__ import annotations

from ollm.contract import LoadedModel, WorkerInfo
from ollm.derived import DerivedModel, apply
from ollm.generation import ChatMessage, GenerationRequest
from ollm.sampling_defaults import sampling_params
from ollm.settings import GenerationSettings
from server.scheduler import Weights, candidates, choose, too_large

MB = 1 << 20


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
