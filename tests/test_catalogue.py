"""The catalogue: listing, materialization checks, model info from headers, removal."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest

from ollm.catalogue import (
    BUILTIN_MODELS,
    MANIFEST_NAME,
    list_models,
    materialized_path,
    model_info,
    remove_model,
    require_materialized,
    resolve,
)
from ollm.errors import InvalidRequestError, ModelNameClashError, ModelNotFoundError, ModelNotMaterializedError
from ollm.plan import plan_model
from ollm.settings import RuntimeSettings

LLAMA_CONFIG = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "max_position_embeddings": 2048,
}
TOOLS_TEMPLATE = "{% if tools %}{{ tools | tojson }}{% endif %}{% for m in messages %}{{ m.content }}{% endfor %}"


def by_reference(runtime: RuntimeSettings) -> dict[str, Any]:
    return {listing.reference: listing for listing in list_models(runtime)}


def test_empty_models_dir_lists_builtins_and_only_echo_is_materialized(tmp_runtime: RuntimeSettings) -> None:
    listings = by_reference(tmp_runtime)
    assert list(listings) == [entry.alias for entry in BUILTIN_MODELS]
    assert {ref for ref, item in listings.items() if item.availability == "materialized"} == {"echo"}
    assert listings["smollm2-135m-instruct"].repo_id == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert listings["gpt-oss-20B"].repo_id == "openai/gpt-oss-20b"
    assert listings["all-minilm-l6-v2"].capabilities == ["embeddings"]


def test_discovered_local_directories(tmp_runtime: RuntimeSettings, make_model_dir: Any) -> None:
    models = tmp_runtime.resolved_models_dir()
    make_model_dir(models / "Qwen--Qwen2.5-0.5B", LLAMA_CONFIG, files={"chat_template.jinja": TOOLS_TEMPLATE})
    make_model_dir(models / "my-finetune", {"model_type": "t5", "is_encoder_decoder": True})
    (models / "half-copied").mkdir()
    # In-progress pulls and removals are ollm's own dot-directories and are never listed.
    make_model_dir(models / ".partial-llama3-1B-chat.0123abcd", LLAMA_CONFIG)
    make_model_dir(models / ".removing-old.0123abcd", LLAMA_CONFIG)

    listings = by_reference(tmp_runtime)
    qwen = listings["Qwen/Qwen2.5-0.5B"]
    assert (qwen.origin, qwen.kind, qwen.availability) == ("discovered-local", "causal-lm", "materialized")
    assert qwen.capabilities == ["chat", "completion", "tools"]
    assert qwen.size == sum(f.stat().st_size for f in (models / "Qwen--Qwen2.5-0.5B").iterdir())
    finetune = listings["my-finetune"]
    assert (finetune.kind, finetune.capabilities) == ("seq2seq", ["completion"])
    assert listings["half-copied"].availability == "not-materialized"
    assert not any("partial" in ref or "removing" in ref for ref in listings)
    assert listings["llama3-1B-chat"].availability == "not-materialized"


def test_materialized_alias_and_repo_dirs(tmp_runtime: RuntimeSettings, make_model_dir: Any) -> None:
    models = tmp_runtime.resolved_models_dir()
    assert materialized_path("llama3-1B-chat", tmp_runtime) is None
    make_model_dir(models / "llama3-1B-chat", LLAMA_CONFIG)
    make_model_dir(models / "org--model", LLAMA_CONFIG)
    assert materialized_path("LLAMA3-1b-CHAT", tmp_runtime) == models / "llama3-1B-chat"
    assert materialized_path("org/model", tmp_runtime) == models / "org--model"
    assert materialized_path("echo", tmp_runtime) is None


def test_a_directory_in_models_dir_answers_to_its_name(
    tmp_runtime: RuntimeSettings, make_model_dir: Any, tmp_path: Path
) -> None:
    models = tmp_runtime.resolved_models_dir()
    mine = make_model_dir(models / "synthetic-1g", LLAMA_CONFIG, files={"chat_template.jinja": "x"})
    # Copied from a pulled model, manifest and all: the manifest's reference is stored elsewhere,
    # so the directory is still named by its own name.
    copy = make_model_dir(models / "smol-copy", LLAMA_CONFIG)
    manifest = {"reference": "smollm2-135m-instruct", "source": "pypi-wheel", "created_at": "2026-01-01T00:00:00Z"}
    (copy / MANIFEST_NAME).write_text(json.dumps({**manifest, "digest": "sha256:00", "size": 1}))
    listings = by_reference(tmp_runtime)
    listing = listings["synthetic-1g"]
    assert (listing.path, listing.availability, listing.problem) == (mine, "materialized", None)
    assert listings["smol-copy"].path == copy
    assert [item.reference for item in list_models(tmp_runtime)].count("smollm2-135m-instruct") == 1

    # Every way in reads the same directory: the catalogue, the plan (what workers load), info.
    assert materialized_path("synthetic-1g", tmp_runtime) == mine
    plan = plan_model("synthetic-1g", tmp_runtime)
    assert (plan.path, plan.resolved_reference, plan.backend) == (mine, "synthetic-1g", "optimized-native")
    info = model_info("synthetic-1g", tmp_runtime)
    assert (info["reference_kind"], info["path"], info["source"]) == ("local_name", str(mine), "local")
    # The path keeps working.
    assert plan_model(str(mine), tmp_runtime).path == mine
    # Names are the models directory's, never another directory's.
    other = RuntimeSettings.model_validate({"models_dir": tmp_path / "other"})
    with pytest.raises(ModelNotFoundError, match=f"{tmp_path / 'other'} has no model directory"):
        plan_model("synthetic-1g", other)
    assert remove_model("synthetic-1g", tmp_runtime) == mine and not mine.exists()
    odd = make_model_dir(models / "two words", LLAMA_CONFIG)
    listing = by_reference(tmp_runtime)[str(odd)]
    assert listing.problem is not None and "rename it to address it by name" in listing.problem
    assert plan_model(str(odd), tmp_runtime).path == odd


@pytest.mark.parametrize("directory", ["Echo", "echo", "echo:latest", "SmolLM2-135M-Instruct", "gpt-oss-20b:latest"])
def test_a_directory_named_like_an_alias_is_a_clash_said_not_settled(
    tmp_runtime: RuntimeSettings, make_model_dir: Any, directory: str
) -> None:
    models = tmp_runtime.resolved_models_dir()
    clashing = make_model_dir(models / directory, LLAMA_CONFIG)
    alias = directory.removesuffix(":latest").lower()
    # The listing goes on, and lists the directory by its path with the problem and the way out.
    listing = by_reference(tmp_runtime)[str(clashing)]
    assert listing.problem is not None
    assert "rename the directory" in listing.problem and str(clashing) in listing.problem
    # Addressing the name is refused everywhere it is resolved, whatever the spelling.
    for name in (alias, alias.upper()):
        with pytest.raises(ModelNameClashError) as caught:
            resolve(name, tmp_runtime)
        assert caught.value.status == 409 and str(clashing) in str(caught.value)
        with pytest.raises(ModelNameClashError):
            plan_model(name, tmp_runtime)
    # Its path still works.
    assert plan_model(str(clashing), tmp_runtime).path == clashing


def test_an_alias_own_directory_is_no_clash(tmp_runtime: RuntimeSettings, make_model_dir: Any) -> None:
    models = tmp_runtime.resolved_models_dir()
    own = make_model_dir(models / "llama3-1B-chat", LLAMA_CONFIG)
    (models / "Echo").mkdir()  # no config.json: no model, so no clash
    listings = by_reference(tmp_runtime)
    assert (listings["llama3-1B-chat"].origin, listings["llama3-1B-chat"].path) == ("built-in", own)
    assert listings[str(models / "Echo")].problem is None
    assert resolve("llama3-1b-chat", tmp_runtime).kind == "alias"
    assert resolve("echo", tmp_runtime).kind == "alias"


def test_local_directory_is_used_in_place(tmp_runtime: RuntimeSettings, make_model_dir: Any, tmp_path: Path) -> None:
    local = make_model_dir(tmp_path / "elsewhere", LLAMA_CONFIG)
    assert require_materialized(str(local), tmp_runtime) == local
    with pytest.raises(ModelNotFoundError, match="does not exist or has no config.json"):
        require_materialized(str(tmp_path / "missing"), tmp_runtime)


@pytest.mark.parametrize("reference", ["llama3-8B-chat", "Qwen/Qwen2.5-7B-Instruct"])
def test_not_materialized_error_says_how_to_pull(tmp_runtime: RuntimeSettings, reference: str) -> None:
    with pytest.raises(ModelNotMaterializedError) as caught:
        require_materialized(reference, tmp_runtime)
    assert f"ollm models pull {reference}" in str(caught.value)
    assert caught.value.status == 404


def test_info_counts_parameters_from_safetensors_headers(
    tmp_runtime: RuntimeSettings, make_model_dir: Any, tmp_path: Path
) -> None:
    shapes = {"embed.weight": (100, 16), "layers.0.mlp.weight": (16, 48), "norm.weight": (16,)}
    local = make_model_dir(tmp_path / "m", LLAMA_CONFIG, tensors=shapes, files={"chat_template.jinja": "x"})
    info = model_info(str(local), tmp_runtime)
    assert info["parameters"] == sum(math.prod(shape) for shape in shapes.values())
    assert info["parameters_source"] == "safetensors headers"
    assert (info["architecture"], info["context_length"], info["kind"]) == ("LlamaForCausalLM", 2048, "causal-lm")
    assert info["capabilities"] == ["chat", "completion", "tools"]
    assert info["plan"]["backend"] == "optimized-native"


def test_info_of_unpulled_alias_uses_catalogue_metadata(tmp_runtime: RuntimeSettings) -> None:
    info = model_info("gemma3-12B", tmp_runtime)
    assert info["availability"] == "not-materialized"
    assert (info["kind"], info["architecture"]) == ("image-text", "Gemma3ForConditionalGeneration")
    assert info["parameters_source"] == "catalogue"
    assert info["plan"]["specialization_provider"] == "gemma3"


def test_info_of_unpulled_repo_id_has_no_plan(tmp_runtime: RuntimeSettings) -> None:
    info = model_info("Qwen/Qwen2.5-7B-Instruct", tmp_runtime)
    assert info["plan"] is None
    assert "ollm models pull Qwen/Qwen2.5-7B-Instruct" in info["plan_error"]


def test_remove_model(tmp_runtime: RuntimeSettings, make_model_dir: Any, tmp_path: Path) -> None:
    models = tmp_runtime.resolved_models_dir()
    make_model_dir(models / "org--model", LLAMA_CONFIG)
    assert remove_model("org/model", tmp_runtime) == models / "org--model"
    assert not (models / "org--model").exists()
    assert not [p for p in models.iterdir() if p.is_dir()]
    with pytest.raises(ModelNotFoundError, match="nothing to remove"):
        remove_model("org/model", tmp_runtime)
    with pytest.raises(InvalidRequestError, match="outside the models directory"):
        remove_model(str(make_model_dir(tmp_path / "mine", LLAMA_CONFIG)), tmp_runtime)
    assert (tmp_path / "mine" / "config.json").exists()
    with pytest.raises(InvalidRequestError, match="built in"):
        remove_model("echo", tmp_runtime)


def test_cli_list_json_and_installed(cli: Any, tmp_path: Path, make_model_dir: Any) -> None:
    models = tmp_path / "models"
    make_model_dir(models / "org--model", LLAMA_CONFIG)
    result = cli("models", "list", "--json", "--models-dir", str(models))
    assert result.exit_code == 0, result.output
    listed = {item["reference"]: item for item in json.loads(result.stdout)}
    assert set(listed) == {entry.alias for entry in BUILTIN_MODELS} | {"org/model"}
    assert listed["org/model"]["path"] == str(models / "org--model")

    result = cli("models", "list", "--installed", "--json", "--models-dir", str(models))
    assert [item["reference"] for item in json.loads(result.stdout)] == ["echo", "org/model"]

    table = cli("models", "list", "--models-dir", str(models))
    assert table.exit_code == 0 and "org/model" in table.stdout


def test_cli_rm(cli: Any, tmp_path: Path, make_model_dir: Any) -> None:
    models = tmp_path / "models"
    make_model_dir(models / "llama3-1B-chat", LLAMA_CONFIG)
    result = cli("models", "rm", "llama3-1B-chat", "--models-dir", str(models))
    assert result.exit_code == 0, result.output
    assert not (models / "llama3-1B-chat").exists()
    again = cli("models", "rm", "llama3-1B-chat", "--models-dir", str(models))
    assert again.exit_code == 1
    assert "nothing to remove" in again.stderr


def test_info_of_missing_local_directory_is_not_found(tmp_runtime: RuntimeSettings, tmp_path: Path) -> None:
    with pytest.raises(ModelNotFoundError, match="does not exist or has no config.json"):
        model_info(str(tmp_path / "missing"), tmp_runtime)
