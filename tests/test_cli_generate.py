"""`ollm prompt` and `ollm chat` as a user runs them: the real command, the real model."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from ollm.settings import RuntimeSettings

pytestmark = pytest.mark.slow

OLLM = str(Path(sys.executable).parent / "ollm")


def ollm(*args: str, stdin: str | None = None, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [OLLM, *args],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, **(env or {})},
    )


@pytest.fixture(scope="module")
def models_dir(default_runtime: RuntimeSettings, default_model_dir: Path) -> str:
    return str(default_runtime.resolved_models_dir())


def test_prompt_answers_paris(models_dir: str) -> None:
    done = ollm("prompt", "What is the capital of France?", "--temperature", "0", "--models-dir", models_dir)
    assert done.returncode == 0, done.stderr
    # The semantic anchor kept on every kernel: the model's answer by a wide margin.
    assert "Paris" in done.stdout
    # Nothing but the answer reaches the user's terminal: no deprecation or other warnings.
    assert "Warning" not in done.stdout + done.stderr, done.stderr


def test_prompt_json_from_stdin_with_system_and_metadata(models_dir: str) -> None:
    done = ollm(
        "prompt",
        "-",
        "--json",
        "--temperature",
        "0",
        "--system",
        "Answer in one word.",
        "--models-dir",
        models_dir,
        stdin="What is the capital of France?",
    )
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert "Paris" in result["text"]
    assert result["finish_reason"] == "stop"
    assert result["usage"]["total_tokens"] == result["usage"]["prompt_tokens"] + result["usage"]["completion_tokens"]
    execution = result["execution"]
    assert (execution["backend"], execution["applied_passes"]) == ("optimized-native", ["llama.sdpa-attention"])
    assert execution["device"] == "cpu"
    assert execution["specialization_state"] and "fallback_reason" in execution


def test_prompt_seed_repeats_and_limits_give_finish_reasons(models_dir: str, cli: Any) -> None:
    args = ("prompt", "Tell me a joke.", "--json", "--seed", "11", "--temperature", "1.0", "--max-new-tokens", "6",
            "--models-dir", models_dir)  # fmt: skip
    done = ollm(*args)
    assert done.returncode == 0, done.stderr
    first = json.loads(done.stdout)
    assert first["finish_reason"] == "length"
    # Again, in this process (whose random state is anything by now): the seed alone decides.
    again = cli(*args)
    assert again.exit_code == 0, again.output
    assert json.loads(again.stdout)["text"] == first["text"]


def test_prompt_plan_json_prints_the_plan_without_generating(models_dir: str) -> None:
    done = ollm("prompt", "hi", "--plan-json", "--no-specialization", "--models-dir", models_dir)
    assert done.returncode == 0, done.stderr
    plan = json.loads(done.stdout)
    assert plan["backend"] == "transformers-generic"
    assert plan["specialization_state"] == "disabled"


def test_bad_settings_fail_fast_naming_the_source(models_dir: str) -> None:
    done = ollm("prompt", "hi", "--models-dir", models_dir, env={"OLLM_GENERATION__TEMPERATURE": "hot"})
    assert done.returncode == 2
    assert "OLLM_GENERATION__TEMPERATURE='hot'" in done.stderr
    bad_backend = ollm("prompt", "hi", "--backend", "turbo", "--models-dir", models_dir)
    assert bad_backend.returncode == 2
    assert "transformers-generic" in bad_backend.stderr


def test_provider_reference_is_rejected(models_dir: str) -> None:
    done = ollm("prompt", "hi", "--model", "openai:gpt-4o", "--models-dir", models_dir)
    assert done.returncode != 0
    assert "local" in done.stderr.lower()


def test_chat_refuses_without_a_terminal(models_dir: str) -> None:
    done = ollm("chat", "--models-dir", models_dir, stdin="hello\n")
    assert done.returncode == 2
    assert "ollm prompt" in done.stderr
