"""The memory budget and the plan's estimates, on small real model directories (no weights loaded)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import save_file
from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import LlamaMLP

from ollm.engine.batch_invariant import _fixed_rows_linear
from ollm.engine.chunked_mlp import chunk_mlps
from ollm.engine.loader import load_engine
from ollm.errors import MemoryBudgetError, SettingsError
from ollm.memory import FULL_ATTENTION_SLACK, parse_size
from ollm.plan import jobs_at_once, plan_model
from ollm.settings import RuntimeSettings, load_settings

# A small llama: 2 layers, hidden 64, 4 heads of 16 (2 KV heads), intermediate 256, vocab 1000.
LLAMA = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "max_position_embeddings": 1024,
    "num_hidden_layers": 2,
    "hidden_size": 64,
    "intermediate_size": 256,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "vocab_size": 1000,
}
TENSORS = {
    "model.embed_tokens.weight": (1000, 64),
    **{f"model.layers.{i}.mlp.gate_proj.weight": (256, 64) for i in range(2)},
    **{f"model.layers.{i}.mlp.up_proj.weight": (256, 64) for i in range(2)},
    **{f"model.layers.{i}.mlp.down_proj.weight": (64, 256) for i in range(2)},
    **{f"model.layers.{i}.self_attn.q_proj.weight": (64, 64) for i in range(2)},
    **{f"model.layers.{i}.self_attn.k_proj.weight": (32, 64) for i in range(2)},
    **{f"model.layers.{i}.self_attn.v_proj.weight": (32, 64) for i in range(2)},
    **{f"model.layers.{i}.self_attn.o_proj.weight": (64, 64) for i in range(2)},
}
PARAMETERS = sum(a * b for a, b in TENSORS.values())
KV_PER_TOKEN_F32 = 2 * 2 * 2 * 16 * 4  # keys and values x layers x KV heads x head_dim x 4 bytes


def runtime(tmp_runtime: RuntimeSettings, **fields: Any) -> RuntimeSettings:
    return RuntimeSettings.model_validate(tmp_runtime.model_dump() | fields)


@pytest.fixture
def llama_dir(make_model_dir: Any, tmp_path: Path) -> Path:
    path: Path = make_model_dir(tmp_path / "llama", LLAMA, TENSORS)
    return path


@pytest.mark.parametrize(
    ("text", "size"),
    [("auto", "auto"), ("512MiB", 512 * 2**20), ("8GiB", 8 * 2**30), ("6GB", 6 * 10**9), ("1.5 GiB", 3 * 2**29),
     ("4096", 4096), (123, 123)],
)  # fmt: skip
def test_budget_sizes(text: str | int, size: int | str) -> None:
    assert parse_size(text) == size


@pytest.mark.parametrize("text", ["lots", "-1", "8 parsecs", "0", ""])
def test_bad_budget_is_a_settings_error_naming_the_source(text: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OLLM_RUNTIME__MEMORY_BUDGET", text)
    with pytest.raises(SettingsError, match="runtime.memory_budget.*OLLM_RUNTIME__MEMORY_BUDGET"):
        load_settings()


def test_budget_from_env_toml_and_flag(cli: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "ollm.toml").write_text('[runtime]\nmemory_budget = "2GiB"\n')
    monkeypatch.setenv("OLLM_CONFIG_FILE", str(tmp_path / "ollm.toml"))
    assert load_settings().runtime.memory_budget == 2 * 2**30
    monkeypatch.setenv("OLLM_RUNTIME__MEMORY_BUDGET", "3GiB")
    assert load_settings().runtime.memory_budget == 3 * 2**30
    result = cli("models", "info", "echo", "--plan-json", "--memory-budget", "nonsense")
    assert result.exit_code == 2
    assert "--memory-budget='nonsense'" in result.stderr


def test_plan_estimates_weights_kv_and_activations_from_the_files(
    llama_dir: Path, tmp_runtime: RuntimeSettings
) -> None:
    plan = plan_model(str(llama_dir), runtime(tmp_runtime, dtype="float32", memory_budget="1GiB"))
    memory = plan.memory
    assert (memory.budget_bytes, memory.budget_source) == (2**30, "runtime.memory_budget")
    assert memory.weights_bytes == PARAMETERS * 4
    assert memory.kv_cache_tokens == 1024
    # The context and the spare columns its full layers grow into (slack_layer.py).
    assert memory.kv_cache_bytes == (1024 + FULL_ATTENTION_SLACK) * KV_PER_TOKEN_F32
    assert memory.activations_bytes is not None and memory.activations_bytes > 0
    assert plan.expected_peak_bytes() == memory.weights_bytes + memory.kv_cache_bytes + memory.activations_bytes
    assert (memory.strategy, memory.fits, memory.required_passes) == ("resident", True, [])

    # bfloat16 halves the weights and the cache: the headers are counted in the run dtype.
    half = plan_model(str(llama_dir), runtime(tmp_runtime, dtype="bfloat16", memory_budget="1GiB")).memory
    assert (half.weights_bytes, half.kv_cache_bytes) == (PARAMETERS * 2, memory.kv_cache_bytes // 2)

    # A given context sizes the cache.
    short = plan_model(str(llama_dir), runtime(tmp_runtime, dtype="float32"), context_tokens=100).memory
    assert short.kv_cache_bytes == (100 + FULL_ATTENTION_SLACK) * KV_PER_TOKEN_F32


def test_auto_budget_is_free_memory_less_a_margin(llama_dir: Path, tmp_runtime: RuntimeSettings) -> None:
    import psutil

    plan = plan_model(str(llama_dir), runtime(tmp_runtime, dtype="float32"))
    assert plan.memory.budget_source is not None and plan.memory.budget_source.startswith("auto:")
    assert plan.memory.budget_bytes is not None
    assert 0 < plan.memory.budget_bytes < psutil.virtual_memory().total
    assert not plan.memory.enforced


def test_chunked_mlp_is_applied_and_shrinks_the_activation_estimate(
    llama_dir: Path, tmp_runtime: RuntimeSettings
) -> None:
    plain = plan_model(str(llama_dir), runtime(tmp_runtime, dtype="float32"), context_tokens=8)
    assert plain.applied_passes == ["llama.sdpa-attention"] and plain.dense_projection_chunk_rows == 0
    chunked = plan_model(
        str(llama_dir), runtime(tmp_runtime, dtype="float32", dense_projection_chunk_rows=4), context_tokens=8
    )
    assert chunked.applied_passes == ["llama.sdpa-attention", "llama.chunked-mlp"]
    assert chunked.dense_projection_chunk_rows == 4
    assert "llama.chunked-mlp" not in (chunked.fallback_reason or "")  # it is not among the missing passes
    assert chunked.memory.activations_bytes is not None and plain.memory.activations_bytes is not None
    assert chunked.memory.activations_bytes < plain.memory.activations_bytes
    generic = plan_model(
        str(llama_dir),
        runtime(tmp_runtime, dense_projection_chunk_rows=4, use_specialization=False),
    )
    assert generic.applied_passes == []


def test_kv_cache_capped_to_what_an_explicit_budget_leaves(llama_dir: Path, tmp_runtime: RuntimeSettings) -> None:
    roomy = plan_model(str(llama_dir), runtime(tmp_runtime, dtype="float32", memory_budget="1GiB")).memory
    assert roomy.activations_bytes is not None
    # The weights and a forward fit, and 100 tokens of cache; the full context's cache does not.
    budget = PARAMETERS * 4 + roomy.activations_bytes + 100 * KV_PER_TOKEN_F32
    plan = plan_model(str(llama_dir), runtime(tmp_runtime, dtype="float32", memory_budget=budget))
    memory = plan.memory
    assert memory.strategy == "resident-capped-kv"
    assert memory.required_passes == ["llama.kv-offload"]
    assert memory.kv_cache_token_limit == 100
    assert memory.expected_peak_bytes is not None and memory.expected_peak_bytes <= budget
    assert plan.fallback_reason is not None and "capped at" in plan.fallback_reason


def test_budget_below_the_weights_refuses_with_numbers(llama_dir: Path, tmp_runtime: RuntimeSettings) -> None:
    settings = load_settings({"runtime": {"models_dir": tmp_runtime.models_dir, "dtype": "float32",
                                          "memory_budget": "100KiB"}})  # fmt: skip
    plan = plan_model(str(llama_dir), settings.runtime)
    memory = plan.memory
    assert (memory.strategy, memory.fits, memory.kv_cache_token_limit) == ("over-budget", False, 0)
    assert memory.required_passes == ["llama.layer-offload", "llama.kv-offload"]
    assert memory.refuses_load() and not memory.layer_streaming
    # These files lack the final norm, so the layers cannot stream, and the plan says why.
    why = "llama.layer-offload would stream the layers, but cannot here: not a decoder's layout"
    assert why in (memory.reason or "")
    # The refusal comes before any weight is read (the test files hold zeros, not a model).
    with pytest.raises(MemoryBudgetError, match=r"weights .*exceeds the budget of 100.0 KiB.*Loading refuses"):
        load_engine(plan, settings)


def test_auto_budget_too_small_reports_but_does_not_refuse(llama_dir: Path, tmp_runtime: RuntimeSettings) -> None:
    plan = plan_model(str(llama_dir), runtime(tmp_runtime, dtype="float32"), context_tokens=10**9)
    assert plan.memory.strategy == "over-budget" and not plan.memory.refuses_load()
    # A billion tokens: even one layer's cache in memory would not fit, so KV offload cannot help.
    assert not plan.memory.kv_offload and plan.memory.required_passes[-1] == "llama.kv-offload"
    assert plan.fallback_reason is not None and "Running resident anyway" in plan.fallback_reason


def test_no_safetensors_means_unknown_not_zero(
    make_model_dir: Any, tmp_path: Path, tmp_runtime: RuntimeSettings
) -> None:
    path = make_model_dir(tmp_path / "m", LLAMA)
    (path / "model.safetensors").unlink()
    memory = plan_model(str(path), tmp_runtime).memory
    assert (memory.weights_bytes, memory.expected_peak_bytes, memory.strategy) == (None, None, "unknown")
    assert memory.reason is not None and "no safetensors" in memory.reason


def test_plan_memory_shown_by_cli_and_doctor(cli: Any, llama_dir: Path, tmp_path: Path) -> None:
    result = cli("models", "info", str(llama_dir), "--plan-json", "--dtype", "float32", "--memory-budget", "1GiB")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["memory"]["weights_bytes"] == PARAMETERS * 4
    info = cli("models", "info", str(llama_dir), "--json", "--dtype", "float32", "--memory-budget", "1GiB")
    assert json.loads(info.stdout)["plan"]["memory"]["budget_bytes"] == 2**30
    table = cli("models", "info", str(llama_dir), "--dtype", "float32", "--memory-budget", "1GiB")
    assert "plan: memory" in table.stdout and "resident" in table.stdout
    doctor = cli("doctor", "--plan-json", "--model", str(llama_dir), "--memory-budget", "512MiB")
    assert doctor.exit_code == 0, doctor.output
    assert json.loads(doctor.stdout)["memory"]["budget_bytes"] == 512 * 2**20
    report = cli("doctor", "--json", "--model", str(llama_dir), "--memory-budget", "512MiB")
    assert json.loads(report.stdout)["plan"]["memory"]["strategy"] == "resident"
    table = cli("doctor", "--model", str(llama_dir), "--memory-budget", "512MiB")
    assert "memory plan" in table.stdout and "512.0 MiB budget" in table.stdout


def test_chunked_mlp_bounds_rows_and_keeps_the_result() -> None:
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=32, intermediate_size=96, num_attention_heads=2, hidden_act="silu")
    mlp = LlamaMLP(config).float()
    x = torch.randn(2, 37, 32)
    expected = mlp(x)
    seen: list[int] = []
    mlp.gate_proj.register_forward_hook(lambda _m, inputs, _o: seen.append(inputs[0].shape[0]))
    assert chunk_mlps(mlp, rows=8) == 1
    torch.testing.assert_close(mlp(x), expected)
    assert max(seen) == 8 and sum(seen) == 74  # 74 rows in chunks of at most 8


def test_chunked_mlp_composes_with_fixed_row_linears() -> None:
    # Batch-invariant mode pads every linear to a fixed row count; chunks go through it.
    from functools import partial

    torch.manual_seed(0)
    mlp = LlamaMLP(LlamaConfig(hidden_size=16, intermediate_size=48, num_attention_heads=2, hidden_act="silu")).float()
    x = torch.randn(1, 20, 16)
    expected = mlp(x)
    rows: list[int] = []
    for linear in (mlp.gate_proj, mlp.up_proj, mlp.down_proj):
        linear.forward = partial(_fixed_rows_linear, linear.forward, 6)  # type: ignore[method-assign]
    mlp.down_proj.register_forward_hook(lambda _m, _i, out: rows.append(out.shape[0]))
    chunk_mlps(mlp, rows=4)
    torch.testing.assert_close(mlp(x), expected)
    assert rows == [4] * 5  # each chunk is computed at the fixed 6 rows, and only its own 4 kept


def test_save_file_headers_are_what_the_plan_reads(tmp_path: Path, tmp_runtime: RuntimeSettings) -> None:
    # Integer tensors keep their own width; floating ones are counted in the run dtype.
    path = tmp_path / "mixed"
    path.mkdir()
    (path / "config.json").write_text(json.dumps(LLAMA))
    save_file({"a": torch.zeros(10, 10, dtype=torch.bfloat16), "b": torch.zeros(10, dtype=torch.int64)},
              str(path / "model-00001.safetensors"))  # fmt: skip
    save_file({"c": torch.zeros(5, dtype=torch.float32)}, str(path / "model-00002.safetensors"))
    memory = plan_model(str(path), runtime(tmp_runtime, dtype="float32")).memory
    assert memory.weights_bytes == 100 * 4 + 10 * 8 + 5 * 4


def test_embedding_models_have_no_kv_cache_and_unpulled_models_no_estimate(
    make_model_dir: Any, tmp_path: Path, tmp_runtime: RuntimeSettings
) -> None:
    bert = {"model_type": "bert", "architectures": ["BertModel"], "max_position_embeddings": 512,
            "num_hidden_layers": 2, "hidden_size": 32, "num_attention_heads": 2, "vocab_size": 100}  # fmt: skip
    path = make_model_dir(tmp_path / "bert", bert, {"embeddings.weight": (100, 32)})
    memory = plan_model(str(path), runtime(tmp_runtime, dtype="float32")).memory
    assert (memory.kv_cache_tokens, memory.kv_cache_bytes, memory.strategy) == (0, 0, "resident")
    assert memory.expected_peak_bytes == 100 * 32 * 4 + (memory.activations_bytes or 0)

    unpulled = plan_model("gpt-oss-20B", tmp_runtime).memory
    assert (unpulled.expected_peak_bytes, unpulled.strategy) == (None, "unknown")
    assert unpulled.reason is not None and "not materialized" in unpulled.reason


def test_auto_max_batch_is_what_the_budget_leaves_kv_room_for(llama_dir: Path, tmp_runtime: RuntimeSettings) -> None:
    roomy = plan_model(str(llama_dir), runtime(tmp_runtime, dtype="float32", memory_budget="1GiB"))
    assert (roomy.max_batch, roomy.max_batch_reason) == (128, "auto: 128, the most for cpu")
    memory = roomy.memory
    assert memory.weights_in_memory_bytes is not None and memory.activations_bytes is not None
    # Room for ten prefill steps of 256 tokens and a bit: ten sequences.
    budget = memory.weights_in_memory_bytes + memory.activations_bytes + (10 * 256 + 100) * KV_PER_TOKEN_F32
    tight = plan_model(str(llama_dir), runtime(tmp_runtime, dtype="float32", memory_budget=budget))
    assert tight.max_batch == 10
    assert tight.max_batch_reason == (
        "auto: the budget leaves 1.3 MiB beside the weights and one forward, 128.0 KiB a sequence at one prefill "
        "step (256 tokens)"
    )
    # Nothing left for the KV cache still decodes one sequence at a time.
    bare = memory.weights_in_memory_bytes + memory.activations_bytes
    assert plan_model(str(llama_dir), runtime(tmp_runtime, dtype="float32", memory_budget=bare)).max_batch == 1
    # An explicit worker.max_batch is the plan's, whatever the budget; batch-invariant mode keeps 32.
    explicit = plan_model(str(llama_dir), runtime(tmp_runtime, memory_budget=budget), max_batch=200)
    assert (explicit.max_batch, explicit.max_batch_reason) == (200, "worker.max_batch")
    invariant = plan_model(str(llama_dir), runtime(tmp_runtime, batch_invariant=True))
    assert invariant.max_batch == 32
    assert invariant.max_batch_reason == "auto: 32, the most for cpu in batch-invariant mode"


def test_worker_runs_as_many_jobs_as_its_device_batches(tmp_runtime: RuntimeSettings) -> None:
    auto = load_settings({"runtime": {"models_dir": tmp_runtime.models_dir, "device": "cpu"}})
    assert (auto.worker.max_batch, jobs_at_once(auto)) == ("auto", 128)
    explicit = load_settings({"runtime": {"models_dir": tmp_runtime.models_dir}, "worker": {"max_batch": 6}})
    assert jobs_at_once(explicit) == 6
