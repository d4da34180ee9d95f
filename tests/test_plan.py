"""Runtime plans: kind detection, provider selection, honest fallback, forced backends, devices."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import pytest
import torch

from ollm import specialization
from ollm.devices import cpu_has_native_bf16, resolve_device, resolve_dtype
from ollm.errors import ModelNotMaterializedError, SettingsError, UnsupportedModelError
from ollm.plan import plan_model
from ollm.settings import RuntimeSettings
from ollm.specialization import SpecializationProvider, provider_for

LLAMA = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "max_position_embeddings": 4096}


def runtime(tmp_runtime: RuntimeSettings, **fields: Any) -> RuntimeSettings:
    return tmp_runtime.model_copy(update=fields)


@pytest.mark.parametrize(
    ("config", "files", "kind"),
    [
        (LLAMA, {}, "causal-lm"),
        ({"model_type": "t5", "is_encoder_decoder": True, "n_positions": 512}, {}, "seq2seq"),
        (
            {"model_type": "gemma3", "vision_config": {}, "text_config": {"max_position_embeddings": 8192}},
            {},
            "image-text",
        ),
        ({"model_type": "bert", "architectures": ["BertModel"]}, {}, "embedding"),
        (
            {"model_type": "mpnet"},
            {"modules.json": [{"type": "sentence_transformers.models.Transformer"}]},
            "embedding",
        ),
    ],
)
def test_kind_detection_from_config(
    config: dict[str, Any],
    files: dict[str, Any],
    kind: str,
    make_model_dir: Any,
    tmp_path: Path,
    tmp_runtime: RuntimeSettings,
) -> None:
    path = make_model_dir(tmp_path / "m", config, files=files)
    plan = plan_model(str(path), tmp_runtime)
    assert plan.kind == kind
    assert (plan.materialized, plan.path) == (True, path)


def test_llama_plan_runs_the_optimized_native_path(
    make_model_dir: Any, tmp_path: Path, tmp_runtime: RuntimeSettings
) -> None:
    plan = plan_model(str(make_model_dir(tmp_path / "m", LLAMA)), tmp_runtime)
    assert plan.specialization_provider == "llama"
    assert (plan.backend, plan.support_level, plan.specialization_state) == ("optimized-native", "optimized", "applied")
    assert plan.planned_passes == [
        "llama.sdpa-attention", "llama.chunked-mlp", "llama.layer-offload", "llama.kv-offload"
    ]  # fmt: skip
    # Within the budget nothing streams or offloads: only the attention pass applies.
    assert plan.applied_passes == ["llama.sdpa-attention"]
    assert plan.fallback_reason is None
    assert plan.context_length == 4096


def test_model_without_provider_is_generic(make_model_dir: Any, tmp_path: Path, tmp_runtime: RuntimeSettings) -> None:
    plan = plan_model(str(make_model_dir(tmp_path / "m", {"model_type": "gpt2", "n_positions": 1024})), tmp_runtime)
    assert (plan.specialization_state, plan.specialization_provider, plan.fallback_reason) == (
        "not-applicable",
        None,
        None,
    )
    assert plan.context_length == 1024


def test_unknown_model_type_is_unsupported(make_model_dir: Any, tmp_path: Path, tmp_runtime: RuntimeSettings) -> None:
    path = make_model_dir(tmp_path / "m", {"model_type": "no-such-architecture"})
    plan = plan_model(str(path), tmp_runtime)
    assert plan.support_level == "unsupported"
    assert "not known to the installed Transformers" in (plan.fallback_reason or "")
    with pytest.raises(UnsupportedModelError):
        plan_model(str(path), runtime(tmp_runtime, backend="transformers-generic"))


def test_fully_implemented_provider_selects_optimized_native(
    make_model_dir: Any, tmp_path: Path, tmp_runtime: RuntimeSettings, monkeypatch: pytest.MonkeyPatch
) -> None:
    ready = SpecializationProvider(
        name="gpt2-test",
        model_types=frozenset({"gpt2"}),
        pass_ids=("gpt2.a",),
        implemented_passes=frozenset({"gpt2.a"}),
    )
    monkeypatch.setitem(specialization._REGISTRY, "gpt2", ready)
    path = str(make_model_dir(tmp_path / "m", {"model_type": "gpt2"}))
    plan = plan_model(path, tmp_runtime)
    assert (plan.backend, plan.support_level, plan.fallback_reason) == ("optimized-native", "optimized", None)
    assert plan_model(path, runtime(tmp_runtime, backend="optimized-native")).backend == "optimized-native"
    disabled = plan_model(path, runtime(tmp_runtime, use_specialization=False))
    assert (disabled.backend, disabled.specialization_state) == ("transformers-generic", "disabled")


def test_forcing_optimized_native_fails_clearly(
    make_model_dir: Any, tmp_path: Path, tmp_runtime: RuntimeSettings, monkeypatch: pytest.MonkeyPatch
) -> None:
    forced = runtime(tmp_runtime, backend="optimized-native")
    assert plan_model(str(make_model_dir(tmp_path / "llama", LLAMA)), forced).backend == "optimized-native"
    gemma = {"architectures": ["Gemma3ForCausalLM"], "model_type": "gemma3_text"}
    assert plan_model(str(make_model_dir(tmp_path / "gemma", gemma)), forced).backend == "optimized-native"
    # Every provider implements its passes today; one that did not would refuse, naming them.
    unfinished = dataclasses.replace(provider_for("gemma3_text"), implemented_passes=frozenset())  # type: ignore[type-var]
    monkeypatch.setitem(specialization._REGISTRY, "gemma3_text", unfinished)
    with pytest.raises(UnsupportedModelError, match="gemma3 provider passes .* are not implemented yet"):
        plan_model(str(make_model_dir(tmp_path / "gemma", gemma)), forced)
    with pytest.raises(UnsupportedModelError, match="no optimized-native provider applies to model_type 'gpt2'"):
        plan_model(str(make_model_dir(tmp_path / "gpt2", {"model_type": "gpt2"})), forced)
    with pytest.raises(UnsupportedModelError, match="conflicts with use_specialization=false"):
        plan_model("smollm2-135m-instruct", runtime(forced, use_specialization=False))


def test_forced_generic_and_disabled_specialization(tmp_runtime: RuntimeSettings) -> None:
    generic = plan_model("llama3-8B-chat", runtime(tmp_runtime, backend="transformers-generic"))
    assert (generic.specialization_state, generic.fallback_reason) == (
        "disabled",
        "backend forced to transformers-generic",
    )
    disabled = plan_model("llama3-8B-chat", runtime(tmp_runtime, use_specialization=False))
    assert disabled.specialization_state == "disabled"
    assert disabled.planned_passes  # still shown, so the user sees what was turned off


@pytest.mark.parametrize(
    ("alias", "provider", "kind"),
    [
        ("llama3-1B-chat", "llama", "causal-lm"),
        ("gemma3-12B", "gemma3", "image-text"),
        ("qwen3-next-80B", "qwen3-next", "causal-lm"),
        ("gpt-oss-20B", "gpt-oss", "causal-lm"),
        ("voxtral-small-24B", "voxtral", "audio-text"),
        ("all-minilm-l6-v2", None, "embedding"),
    ],
)
def test_unpulled_aliases_plan_from_catalogue(
    alias: str, provider: str | None, kind: str, tmp_runtime: RuntimeSettings
) -> None:
    plan = plan_model(alias, tmp_runtime)
    assert (plan.materialized, plan.path, plan.kind) == (False, None, kind)
    assert plan.specialization_provider == provider
    assert all(pass_id.startswith(f"{provider}.") for pass_id in plan.planned_passes)


def test_echo_plan(tmp_runtime: RuntimeSettings) -> None:
    plan = plan_model("echo", tmp_runtime)
    assert (plan.backend, plan.kind, plan.materialized, plan.path) == ("echo", "echo", True, None)


def test_unpulled_repo_id_cannot_be_planned(tmp_runtime: RuntimeSettings) -> None:
    with pytest.raises(ModelNotMaterializedError, match="ollm models pull org/model"):
        plan_model("org/model", tmp_runtime)


def test_devices() -> None:
    mps = torch.backends.mps.is_available()
    assert resolve_device("auto") == ("cuda" if torch.cuda.is_available() else "mps" if mps else "cpu")
    assert resolve_device("CPU") == "cpu"
    with pytest.raises(SettingsError, match="runtime.device: 'tpu' is not a device"):
        resolve_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(SettingsError, match="CUDA is not available"):
            resolve_device("cuda:0")
    assert resolve_dtype("float16", "cpu") == "float16"
    assert resolve_dtype("auto", "cpu") == ("bfloat16" if cpu_has_native_bf16() else "float32")
    assert resolve_dtype("auto", "mps") == "float32"



def test_cli_plan_json(cli: Any, tmp_path: Path) -> None:
    result = cli("models", "info", "smollm2-135m-instruct", "--plan-json", "--models-dir", str(tmp_path))
    assert result.exit_code == 0, result.output
    plan = json.loads(result.stdout)
    assert plan["reference"] == "smollm2-135m-instruct"
    assert plan["specialization_provider"] == "llama"
    assert plan["backend"] == "optimized-native" and plan["applied_passes"] == ["llama.sdpa-attention"]

    disabled = cli(
        "models", "info", "smollm2-135m-instruct", "--plan-json", "--no-specialization", "--models-dir", str(tmp_path)
    )
    assert json.loads(disabled.stdout)["specialization_state"] == "disabled"

    forced = cli("models", "info", "smollm2-135m-instruct", "--backend", "optimized-native", "--plan-json")
    assert forced.exit_code == 0 and json.loads(forced.stdout)["backend"] == "optimized-native"

    bad = cli("models", "info", "echo", "--backend", "turbo")
    assert bad.exit_code == 2
    assert "'auto', 'optimized-native' or 'transformers-generic'" in bad.stderr


def test_cli_doctor_plan_json(cli: Any, tmp_path: Path) -> None:
    result = cli("doctor", "--plan-json", "--model", "gpt-oss-20B", "--models-dir", str(tmp_path))
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["specialization_provider"] == "gpt-oss"
