"""Shared fixtures: the real default models, isolated settings, throwaway model directories, and the
session's processes.

Processes cost the suite most of its time (each `ollm worker` imports torch and loads the models), so
they are shared wherever tests only read from them:

- ``redis_server``: one real redis-server; every stack isolates itself by its own namespace.
- ``real_stack``: one `ollm serve` and one `ollm worker` serving the real default chat and embedding
  models, for the OpenAI, Anthropic and Ollama suites (their ``live``/``client``/``stack`` fixtures are
  views of it). Use it for any test that only sends requests. A test that needs another server
  setting starts one with ``real_stack.own_server(log, OLLM_...=...)`` and stops it. A test that kills,
  restarts or reconfigures a process (a keep-alive, a model unload) or adds a worker starts a stack
  of its own (``Live(...)`` from tests/integration/harness.py, or the ``start_worker``/``start_server``
  fixtures in tests/integration/conftest.py).
- ``echo_stack`` (tests/integration/conftest.py): the same for the echo model, for pipeline tests.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

if os.environ.get("PYTEST_XDIST_WORKER"):
    # Two test processes share the machine's cores (`make test`): one compute thread each, and in
    # every process they start, so their thread pools do not oversubscribe the cores (set before
    # torch is imported; the processes inherit the environment).
    os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402
from safetensors.torch import save_file
from typer.testing import CliRunner

from ollm.pull import pull_model
from ollm.settings import RuntimeSettings
from workers.redis_server import RedisServer

if TYPE_CHECKING:
    from tests.integration.harness import Live

DEFAULT_CHAT_MODEL = "smollm2-135m-instruct"
DEFAULT_EMBEDDING_MODEL = "all-minilm-l6-v2"
# For structured-output tests on the real model: bounded strings, enums and booleans (a 135M model
# loops on free-form numbers), so every answer ends well inside max tokens.
CITY_SCHEMA = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "maxLength": 12},
        "is_capital": {"type": "boolean"},
        "continent": {"enum": ["Europe", "Asia", "Africa", "America", "Oceania"]},
    },
    "required": ["city", "is_capital", "continent"],
    "additionalProperties": False,
}


def default_models_dir() -> Path:
    """The models dir `make dev` pulls into, so the real models are pulled once per machine."""
    return Path(os.environ.get("OLLM_RUNTIME__MODELS_DIR", "~/.ollm/models")).expanduser()


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Slow files first (stable: in their own order otherwise). `make test` hands whole files to its
    two processes in this order, so the long ones start early and quick unit files fill the end; a
    slow file dealt last kept one process busy alone for a minute (measured)."""
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)


@pytest.fixture(scope="session")
def default_runtime() -> RuntimeSettings:
    return RuntimeSettings.model_validate({"models_dir": default_models_dir()})


@pytest.fixture(scope="session")
def default_model_dir(default_runtime: RuntimeSettings) -> Path:
    """The real default chat model, materialized (pulled on first use, then reused)."""
    return pull_model(DEFAULT_CHAT_MODEL, default_runtime)


@pytest.fixture(scope="session")
def embedding_model_dir(default_runtime: RuntimeSettings) -> Path:
    """The real default embedding model, materialized (pulled on first use, then reused)."""
    return pull_model(DEFAULT_EMBEDDING_MODEL, default_runtime)


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    """One real redis-server for the session; tests isolate themselves by namespace."""
    from tests.integration.harness import free_port

    server = RedisServer(port=free_port()).start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def real_stack(
    tmp_path_factory: pytest.TempPathFactory,
    redis_server: RedisServer,
    default_model_dir: Path,
    embedding_model_dir: Path,
) -> Iterator[Live]:
    """The session's real stack (see the module docstring): started on first use, for tests that only
    read. Requests must not change what it serves (no keep-alive, no unload: see test_ps_and_keep_alive
    for a test with a stack of its own)."""
    from tests.integration.harness import Live

    models = [DEFAULT_CHAT_MODEL, DEFAULT_EMBEDDING_MODEL]
    stack = Live(redis_server.url, tmp_path_factory.mktemp("real-stack"), models)
    try:
        yield stack.start()
    finally:
        stack.stop()


@pytest.fixture
def clean_settings_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """No OLLM_* variables and a cwd without ollm.toml, so only what the test sets counts.

    Returns the working directory (where a test may write its own ollm.toml).
    """
    for name in list(os.environ):
        if name.startswith("OLLM_"):
            monkeypatch.delenv(name)
    workdir = tmp_path / "cwd"
    workdir.mkdir()
    monkeypatch.chdir(workdir)
    return workdir


@pytest.fixture
def tmp_runtime(tmp_path: Path) -> RuntimeSettings:
    """Runtime settings whose models dir is empty and private to the test."""
    return RuntimeSettings.model_validate({"models_dir": tmp_path / "models"})


ModelDirFactory = Callable[..., Path]


@pytest.fixture
def make_model_dir() -> ModelDirFactory:
    """Write a tiny Transformers-shaped directory: config.json plus real safetensors headers.

    ``tensors`` maps names to shapes; extra files (``{"modules.json": [...]}``) are written as JSON
    or text.
    """

    def make(
        path: Path,
        config: dict[str, Any],
        tensors: dict[str, tuple[int, ...]] | None = None,
        files: dict[str, Any] | None = None,
    ) -> Path:
        path.mkdir(parents=True, exist_ok=True)
        (path / "config.json").write_text(json.dumps(config))
        shapes = tensors if tensors is not None else {"embed.weight": (8, 4)}
        save_file({name: torch.zeros(shape) for name, shape in shapes.items()}, str(path / "model.safetensors"))
        for name, content in (files or {}).items():
            (path / name).write_text(content if isinstance(content, str) else json.dumps(content))
        return path

    return make


@pytest.fixture
def cli() -> Callable[..., Any]:
    """Run the real `ollm` command in-process: cli("models", "list", "--json", env={...})."""
    from cli import commands  # noqa: F401  (registers every command on the app)
    from cli.main import app

    runner = CliRunner()

    def invoke(*args: str, env: dict[str, str] | None = None) -> Any:
        return runner.invoke(app, list(args), env=env)

    return invoke
