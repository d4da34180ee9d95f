"""What a model counts against a worker's memory budget: its plan's expected peak, not its weights.

Real model directories (config.json and safetensors headers), real plans; nothing is loaded.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import fakeredis
import pytest

from ollm import catalogue
from ollm.contract import Keys, WorkerInfo, parse_worker
from ollm.settings import Settings
from server.scheduler import Weights, candidates
from tests.test_memory import LLAMA, TENSORS
from workers.memory import counted_bytes, plan_for, planned_bytes, planned_peaks
from workers.residency import Residency


@pytest.fixture
def settings(tmp_path: Path, clean_settings_env: Path) -> Settings:
    return Settings.model_validate({"runtime": {"models_dir": str(tmp_path / "models"), "dtype": "float32"}})


@pytest.fixture
def models(settings: Settings, make_model_dir: Any) -> Path:
    models_dir = settings.runtime.resolved_models_dir()
    make_model_dir(models_dir / "tiny-llama", LLAMA, TENSORS)
    # No safetensors files: the plan cannot estimate this one.
    (models_dir / "no-weights").mkdir(parents=True)
    (models_dir / "no-weights" / "config.json").write_text(json.dumps(LLAMA))
    return models_dir


def test_a_model_counts_as_its_planned_peak_not_its_weights(settings: Settings, models: Path) -> None:
    plan = plan_for(str(models / "tiny-llama"), settings)
    memory = plan.memory
    assert memory.weights_bytes and memory.kv_cache_bytes and memory.activations_bytes
    peak = plan.expected_peak_bytes()
    assert peak == memory.weights_bytes + memory.kv_cache_bytes + memory.activations_bytes
    weights_estimate = catalogue.estimated_memory(plan.path, plan.dtype)
    assert planned_bytes(plan) == peak > weights_estimate
    # Once loaded: the peak, unless the parameters measured take more.
    assert counted_bytes(plan, measured=memory.weights_bytes) == peak
    assert counted_bytes(plan, measured=peak + 1) == peak + 1


def test_the_plan_is_the_workers_own_batch_and_prefill(settings: Settings, models: Path) -> None:
    small = plan_for(str(models / "tiny-llama"), settings).memory.activations_bytes
    wide = settings.model_copy(update={"worker": settings.worker.model_copy(update={"max_batch": 512})})
    assert plan_for(str(models / "tiny-llama"), wide).memory.activations_bytes > small  # type: ignore[operator]


def test_without_a_plan_estimate_the_weights_count_and_the_log_says_so(
    settings: Settings, models: Path, caplog: pytest.LogCaptureFixture
) -> None:
    plan = plan_for(str(models / "no-weights"), settings)
    assert plan.expected_peak_bytes() is None
    with caplog.at_level(logging.INFO, logger="workers.memory"):
        assert planned_bytes(plan) == catalogue.estimated_memory(plan.path, plan.dtype)
        assert counted_bytes(plan, measured=1234) == 1234
    assert "cannot estimate memory" in caplog.text and "counting its weights instead" in caplog.text


def test_the_worker_publishes_the_peaks_the_scheduler_sizes_models_by(settings: Settings, models: Path) -> None:
    peaks = planned_peaks(settings)
    peak = plan_for(str(models / "tiny-llama"), settings).expected_peak_bytes()
    assert peaks == {"tiny-llama": peak}  # the model without an estimate is left out

    # Through the registration, as the server reads it.
    redis_client = fakeredis.FakeRedis()
    residency = Residency(redis_client, Keys("mem"), [], budget=10**9, settings=settings)
    residency.refresh_peaks()
    status = residency.status()
    info = parse_worker({"name": "w", "on_demand": "1", "dtype": "float32", **status}, pttl=30_000)
    assert info.peaks == peaks

    weights, stored = catalogue.weight_bytes(models / "tiny-llama")
    (found,) = candidates([info], [{}], "tiny-llama", Weights(weights, stored, "tiny-llama"))
    assert found.size == peak
    # A worker that published no peak for it (an older worker, a plan without an estimate).
    bare = WorkerInfo(name="old", host="h", pid=1, models=[], on_demand=True, memory_budget=10**9, dtype="float32")
    (fallback,) = candidates([bare], [{}], "tiny-llama", Weights(weights, stored, "tiny-llama"))
    assert peak is not None and fallback.size == catalogue.scaled_memory(weights, stored, "float32") < peak


def test_a_pull_is_planned_at_the_next_sweep(settings: Settings, models: Path, make_model_dir: Any) -> None:
    residency = Residency(fakeredis.FakeRedis(), Keys("mem"), [], settings=settings)
    residency.refresh_peaks()
    assert set(residency.peaks) == {"tiny-llama"}
    make_model_dir(models / "pulled-later", LLAMA, TENSORS)
    residency.refresh_peaks()
    assert set(residency.peaks) == {"tiny-llama", "pulled-later"}
