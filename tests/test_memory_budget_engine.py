"""An explicit memory budget is enforced on the real model: refused with numbers, or the KV cache capped."""

from __future__ import annotations

from typing import Any

import pytest

from ollm.engine.base import stream
from ollm.engine.loader import load_engine
from ollm.generation import ErrorEvent, FinalEvent, GenerationRequest, SamplingParams
from ollm.plan import plan_model
from ollm.settings import RuntimeSettings, Settings, load_settings
from tests.conftest import DEFAULT_CHAT_MODEL
from tests.together import submit_together

pytestmark = pytest.mark.slow


def test_prompt_under_a_budget_below_the_weights_is_refused(
    cli: Any, default_runtime: RuntimeSettings, default_model_dir: Any
) -> None:
    result = cli(
        "prompt", "hi", "--model", DEFAULT_CHAT_MODEL, "--models-dir", str(default_runtime.models_dir),
        "--dtype", "float32", "--memory-budget", "100MiB",
    )  # fmt: skip
    assert result.exit_code == 1
    assert "exceeds the budget of 100.0 MiB" in result.stderr and "llama.layer-offload" in result.stderr
    assert "weights 513.1 MiB" in result.stderr  # 134.5M parameters x 4 bytes, from the headers


def _budget_with_kv_room(runtime: RuntimeSettings, tokens: int) -> Settings:
    """SmolLM2 in float32 under a budget of its weights and one forward plus ``tokens`` of KV cache."""
    roomy = load_settings({"runtime": {"models_dir": runtime.models_dir, "dtype": "float32",
                                       "memory_budget": "8GiB"}})  # fmt: skip
    estimate = plan_model(DEFAULT_CHAT_MODEL, roomy.runtime).memory
    assert estimate.weights_bytes is not None and estimate.activations_bytes is not None
    per_token = 2 * 30 * 3 * 64 * 4  # SmolLM2: 30 layers, 3 KV heads of 64, float32
    budget = estimate.weights_bytes + estimate.activations_bytes + tokens * per_token
    return load_settings({"runtime": {"models_dir": runtime.models_dir, "dtype": "float32",
                                      "memory_budget": budget}})  # fmt: skip


def test_kv_cache_is_capped_to_what_the_budget_leaves(
    default_runtime: RuntimeSettings, default_model_dir: Any
) -> None:
    settings = _budget_with_kv_room(default_runtime, 64)
    plan = plan_model(DEFAULT_CHAT_MODEL, settings.runtime)
    assert (plan.memory.strategy, plan.memory.kv_cache_token_limit) == ("resident-capped-kv", 64)
    engine = load_engine(plan, settings)
    try:
        short = GenerationRequest(
            model=DEFAULT_CHAT_MODEL, prompt="Hello", sampling=SamplingParams(temperature=0.0, max_new_tokens=8)
        )
        assert isinstance(list(stream(engine, short))[-1], FinalEvent)
        long = GenerationRequest(
            model=DEFAULT_CHAT_MODEL, prompt="word " * 100, sampling=SamplingParams(max_new_tokens=8)
        )
        refused = list(stream(engine, long))[-1]
    finally:
        engine.close()
    assert isinstance(refused, ErrorEvent) and refused.code == "context_length_exceeded"
    assert "budget of 64 (what runtime.memory_budget leaves" in refused.message


def test_auto_max_batch_admits_what_the_budget_leaves_kv_room_for(
    default_runtime: RuntimeSettings, default_model_dir: Any
) -> None:
    # Room for three prefill steps of 256 tokens and a bit: three sequences at once.
    settings = _budget_with_kv_room(default_runtime, 3 * 256 + 100)
    plan = plan_model(DEFAULT_CHAT_MODEL, settings.runtime)
    assert settings.worker.max_batch == "auto" and plan.max_batch == 3
    engine = load_engine(plan, settings)
    try:
        requests = [
            GenerationRequest(model=DEFAULT_CHAT_MODEL, id=f"r{i}", prompt=f"Count to {i + 3}.",
                              sampling=SamplingParams(temperature=0.0, max_new_tokens=12, ignore_eos=True))
            for i in range(5)
        ]  # fmt: skip
        events, largest = submit_together(engine, requests)  # type: ignore[arg-type]
    finally:
        engine.close()
    assert all(isinstance(each[-1], FinalEvent) for each in events)
    # Five requests, three decoded together at most: the other two waited for a slot.
    assert largest == 3
