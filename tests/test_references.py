"""Model reference parsing: aliases, repo IDs, local directories, and refused provider references."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from ollm.catalogue import require_materialized
from ollm.errors import InvalidReferenceError, ModelNotFoundError
from ollm.references import confined_to, parse_reference
from ollm.settings import RuntimeSettings


@pytest.mark.parametrize(
    ("raw", "canonical"),
    [
        ("smollm2-135m-instruct", "smollm2-135m-instruct"),
        ("SmolLM2-135M-Instruct", "smollm2-135m-instruct"),
        ("llama3-8b-chat", "llama3-8B-chat"),
        ("  gemma3-12B ", "gemma3-12B"),
        ("ECHO", "echo"),
    ],
)
def test_aliases_are_case_insensitive(raw: str, canonical: str) -> None:
    ref = parse_reference(raw)
    assert (ref.kind, ref.name, ref.raw) == ("alias", canonical, raw)


@pytest.mark.parametrize(
    "raw",
    ["Qwen/Qwen2.5-7B-Instruct", "meta-llama/Llama-3.2-1B-Instruct", "openai/gpt-oss-20b", "google/gemma-3-12b-it"],
)
def test_repo_ids(raw: str) -> None:
    ref = parse_reference(raw)
    assert (ref.kind, ref.name) == ("repo_id", raw)


def test_local_paths(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert parse_reference("/srv/models/x").path == Path("/srv/models/x")
    assert parse_reference("./mine").path == tmp_path / "mine"
    assert parse_reference("~/models/m").path == tmp_path / "models" / "m"


@pytest.mark.parametrize("raw", ["finetune", "synthetic-1g", "Tiny_Llama.v2", "m+lora", "gpt-4"])
def test_a_bare_name_is_a_directory_name(raw: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Whether models_dir has it is the catalogue's to say (tests/test_catalogue.py); the working
    # directory is never looked in, even when it has a model of that name.
    monkeypatch.chdir(tmp_path)
    (tmp_path / raw).mkdir()
    (tmp_path / raw / "config.json").write_text("{}")
    ref = parse_reference(raw)
    assert (ref.kind, ref.name, ref.path, ref.is_local) == ("local_name", raw, None, True)


@pytest.mark.parametrize("raw", [".hidden", "-dash", "two words", "star*", "é", "x" * 256])
def test_names_no_directory_is_addressed_by(raw: str) -> None:
    with pytest.raises(InvalidReferenceError, match="not a built-in alias, nor the name of a model directory"):
        parse_reference(raw)


@pytest.mark.parametrize(
    ("raw", "named"),
    [
        ("openai:gpt-4o", "openai"),
        ("anthropic:claude-3-5-sonnet", "anthropic"),
        ("ollama/llama3", "ollama"),
        ("OpenAI/gpt-4o", "openai"),
        ("groq/llama-3.1-70b", "groq"),
        ("bedrock/anthropic.claude-v2", "bedrock"),
        ("hf://Qwen/Qwen2.5-7B-Instruct", "hf"),
        ("https://huggingface.co/Qwen/Qwen2.5-7B-Instruct", "https"),
        ("mistral:mistral-large", "mistral"),
        ("llama3:8b", "llama3"),
    ],
)
def test_provider_references_are_refused(raw: str, named: str) -> None:
    with pytest.raises(InvalidReferenceError) as caught:
        parse_reference(raw)
    message = str(caught.value)
    assert repr(named) in message
    assert "locally" in message
    assert "Hugging Face repo ID" in message and "local model directory" in message
    assert caught.value.status == 400


def test_hf_scheme_says_what_to_pass() -> None:
    with pytest.raises(InvalidReferenceError, match="pass org/name"):
        parse_reference("hf://Qwen/Qwen2.5-7B-Instruct")


@pytest.mark.parametrize("raw", ["", "   ", "a/b/c", "org/", "bad org/name", "org/na--me", "-org/name", "o/n..x"])
def test_malformed_references(raw: str) -> None:
    with pytest.raises(InvalidReferenceError):
        parse_reference(raw)


def test_unknown_bare_name_is_not_found(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    runtime = RuntimeSettings.model_validate({"models_dir": tmp_path / "models"})
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ModelNotFoundError) as caught:
        require_materialized("gpt-4", runtime)
    assert caught.value.status == 404
    assert "not a built-in alias" in str(caught.value) and str(tmp_path / "models") in str(caught.value)
    # A model of that name in the working directory is pointed at, outside a server only.
    (tmp_path / "gpt-4").mkdir()
    (tmp_path / "gpt-4" / "config.json").write_text("{}")
    with pytest.raises(ModelNotFoundError, match="pass ./gpt-4"):
        require_materialized("gpt-4", runtime)
    with confined_to([tmp_path / "models"]), pytest.raises(ModelNotFoundError) as caught:
        require_materialized("gpt-4", runtime)
    assert "./gpt-4" not in str(caught.value)


def test_cli_refuses_provider_reference(cli: Any) -> None:
    result = cli("models", "info", "ollama/llama3")
    assert result.exit_code == 1
    assert "ollm runs models locally" in result.stderr
    assert "Traceback" not in result.output
