"""Settings precedence (CLI > env > TOML > default) and errors that name the setting and its origin."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from ollm.errors import SettingsError
from ollm.settings import Settings, load_settings, settings_with_origins

pytestmark = pytest.mark.usefixtures("clean_settings_env")

# One field per section, with a distinct value for each layer: (section, field, toml, env, cli).
LAYERED_FIELDS = [
    ("runtime", "device", "cpu", "cuda", "mps"),
    ("runtime", "models_dir", "/toml/models", "/env/models", "/cli/models"),
    ("generation", "max_new_tokens", 11, 22, 33),
    ("server", "port", 8101, 8202, 8303),
    ("redis", "namespace", "toml-ns", "env-ns", "cli-ns"),
    ("worker", "max_batch", 3, 5, 7),
]


def write_toml(path: Path, sections: dict[str, dict[str, Any]]) -> Path:
    lines = []
    for section, values in sections.items():
        lines.append(f"[{section}]")
        lines.extend(f"{key} = {json.dumps(value)}" for key, value in values.items())
    path.write_text("\n".join(lines) + "\n")
    return path


def value_of(settings: Settings, section: str, field: str) -> Any:
    value = getattr(getattr(settings, section), field)
    return str(value) if isinstance(value, Path) else value


@pytest.mark.parametrize(("section", "field", "toml", "env", "cli"), LAYERED_FIELDS)
def test_each_layer_overrides_the_one_below(
    section: str, field: str, toml: Any, env: Any, cli: Any, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    default = value_of(Settings(), section, field)
    assert value_of(load_settings(), section, field) == default

    monkeypatch.setenv("OLLM_CONFIG_FILE", str(write_toml(tmp_path / "ollm.toml", {section: {field: toml}})))
    assert value_of(load_settings(), section, field) == toml

    monkeypatch.setenv(f"OLLM_{section.upper()}__{field.upper()}", str(env))
    assert value_of(load_settings(), section, field) == env

    assert value_of(load_settings({section: {field: cli}}), section, field) == cli


def test_unset_cli_flags_do_not_override(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OLLM_RUNTIME__DEVICE", "cpu")
    assert load_settings({"runtime": {"device": None}}).runtime.device == "cpu"


def test_ollm_toml_in_working_directory_is_read(clean_settings_env: Path) -> None:
    write_toml(clean_settings_env / "ollm.toml", {"generation": {"temperature": 0.0}})
    assert load_settings().generation.temperature == 0.0


def test_origins_name_every_layer(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    toml = write_toml(tmp_path / "conf.toml", {"server": {"port": 9001}, "generation": {"top_k": 5}})
    monkeypatch.setenv("OLLM_CONFIG_FILE", str(toml))
    monkeypatch.setenv("OLLM_GENERATION__TOP_K", "7")
    overrides = {"runtime": {"device": "cpu"}}
    origins = {row["setting"]: row["origin"] for row in settings_with_origins(load_settings(overrides), overrides)}
    assert origins["runtime.device"] == "command-line flag --device='cpu'"
    assert origins["generation.top_k"] == "OLLM_GENERATION__TOP_K='7'"
    assert origins["server.port"] == f"{toml}: [server] port = 9001"
    assert origins["server.host"] == "built-in default"


def test_bad_env_value_names_setting_and_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OLLM_SERVER__PORT", "abc")
    with pytest.raises(SettingsError) as caught:
        load_settings()
    assert "server.port" in str(caught.value)
    assert "OLLM_SERVER__PORT='abc'" in str(caught.value)


def test_out_of_range_toml_value_names_file_and_key(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    toml = write_toml(tmp_path / "ollm.toml", {"generation": {"temperature": 9.5}})
    monkeypatch.setenv("OLLM_CONFIG_FILE", str(toml))
    with pytest.raises(SettingsError) as caught:
        load_settings()
    assert "generation.temperature" in str(caught.value)
    assert f"{toml}: [generation] temperature = 9.5" in str(caught.value)


def test_bad_cli_value_names_flag() -> None:
    with pytest.raises(SettingsError) as caught:
        load_settings({"worker": {"max_batch": 0}})
    assert "worker.max_batch" in str(caught.value)
    assert "command-line flag --max-batch=0" in str(caught.value)


@pytest.mark.parametrize(
    ("sections", "unknown"),
    [({"runtime": {"devcie": "cpu"}}, "runtime.devcie"), ({"sever": {"port": 1}}, "sever")],
)
def test_unknown_toml_key_is_an_error(
    sections: dict[str, dict[str, Any]], unknown: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("OLLM_CONFIG_FILE", str(write_toml(tmp_path / "ollm.toml", sections)))
    with pytest.raises(SettingsError) as caught:
        load_settings()
    assert f"unknown setting '{unknown}'" in str(caught.value)
    assert str(tmp_path / "ollm.toml") in str(caught.value)


def test_malformed_toml_names_the_file(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    bad = tmp_path / "ollm.toml"
    bad.write_text("[runtime\ndevice = 'cpu'\n")
    monkeypatch.setenv("OLLM_CONFIG_FILE", str(bad))
    with pytest.raises(SettingsError, match=f"cannot read config file {bad}"):
        load_settings()


def test_unreadable_config_file(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    # A directory cannot be opened as a file even by root, unlike a chmod 000 file.
    monkeypatch.setenv("OLLM_CONFIG_FILE", str(tmp_path))
    with pytest.raises(SettingsError, match="cannot read config file"):
        load_settings()


def test_missing_explicit_config_file(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("OLLM_CONFIG_FILE", str(tmp_path / "nope.toml"))
    with pytest.raises(SettingsError, match="does not exist"):
        load_settings()


def test_invalid_backend_lists_the_valid_ones() -> None:
    with pytest.raises(SettingsError) as caught:
        load_settings({"runtime": {"backend": "fast"}})
    for name in ("auto", "optimized-native", "transformers-generic"):
        assert name in str(caught.value)


def test_cli_reports_bad_env_value_and_exits_2(cli: Any) -> None:
    result = cli("models", "list", env={"OLLM_SERVER__PORT": "abc"})
    assert result.exit_code == 2
    assert "server.port" in result.stderr
    assert "OLLM_SERVER__PORT='abc'" in result.stderr


def test_doctor_shows_where_each_setting_came_from(cli: Any, tmp_path: Path) -> None:
    toml = write_toml(tmp_path / "ollm.toml", {"generation": {"max_new_tokens": 64}})
    result = cli(
        "doctor",
        "--json",
        "--device",
        "cpu",
        "--models-dir",
        str(tmp_path / "models"),
        env={"OLLM_CONFIG_FILE": str(toml), "OLLM_SERVER__PORT": "8123"},
    )
    assert result.exit_code == 0, result.output
    rows = {row["setting"]: row for row in json.loads(result.stdout)["settings"]}
    assert rows["runtime.device"]["origin"] == "command-line flag --device='cpu'"
    assert rows["server.port"] == {"setting": "server.port", "value": 8123, "origin": "OLLM_SERVER__PORT='8123'"}
    assert rows["generation.max_new_tokens"]["origin"].endswith("[generation] max_new_tokens = 64")
    assert rows["runtime.backend"]["origin"] == "built-in default"


def test_redis_passwords_are_not_shown() -> None:
    from ollm.settings import redacted_url

    assert redacted_url("rediss://ollm:s3cret@redis.internal:6380/0") == "rediss://ollm:***@redis.internal:6380/0"
    assert redacted_url("redis://:s3cret@127.0.0.1:6379/0") == "redis://:***@127.0.0.1:6379/0"
    assert redacted_url("redis://127.0.0.1:6379/0") == "redis://127.0.0.1:6379/0"
