"""Schemathesis fuzzes every operation of /openapi.json against a live stack: no input gets a 5xx,
and every answer matches the schema the server publishes.

The stack is real: a redis-server, one worker serving the echo model (generation routes, fast)
and the real all-minilm-l6-v2 embedding model (embedding routes), and `ollm serve` whose default
models are those two (and whose models dir is empty), so a 503 would mean the service is broken. Deleting operations
and the registry ones (pull, push) are left out: they would remove or fetch models. The seed is
fixed (hypothesis' derandomize) and the example count bounded.
"""

from __future__ import annotations

import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import DEFAULT_EMBEDDING_MODEL
from tests.integration.harness import Server, Worker, new_namespace
from workers.redis_server import RedisServer

pytestmark = pytest.mark.slow

# Per operation and phase. About 30 operations: about a minute on two cores.
EXAMPLES = 30
SEED = 1


@pytest.fixture(scope="module")
def live_url(
    tmp_path_factory: pytest.TempPathFactory, redis_server: RedisServer, embedding_model_dir: Path
) -> Iterator[str]:
    ns = new_namespace()
    logs = tmp_path_factory.mktemp("fuzz")
    defaults = {
        "OLLM_RUNTIME__MODEL_REFERENCE": "echo",
        "OLLM_RUNTIME__EMBEDDING_MODEL_REFERENCE": DEFAULT_EMBEDDING_MODEL,
    }
    worker = Worker(redis_server.url, ns, ["echo", DEFAULT_EMBEDDING_MODEL], logs / "worker.log")
    # A short request timeout: a fuzzed request must never be the one that waits 10 minutes.
    # The server's models dir is empty: every model it knows is one a live worker serves, so a 503
    # ("materialized here, but no worker serves it") cannot be the service's normal state.
    server = Server(
        redis_server.url, ns, logs / "server.log", OLLM_SERVER__REQUEST_TIMEOUT_SECONDS="60",
        OLLM_RUNTIME__MODELS_DIR=str(logs / "models"), **defaults,
    )  # fmt: skip
    try:
        worker.wait_ready()
        server.wait_ready()
        yield server.url
        assert worker.alive(), f"the worker died under fuzzing:\n{worker.output()}"
    finally:
        server.stop()
        worker.stop()


def test_no_input_gets_a_server_error_and_every_answer_matches_the_schema(live_url: str, tmp_path: Path) -> None:
    # Schemathesis' own runner, as a user runs it: every phase (schema examples, boundary
    # "coverage" cases, random fuzzing, stateful sequences), not only random cases. (Its pytest
    # plugin predates pytest 9.)
    command = [
        str(Path(sys.executable).parent / "schemathesis"), "run", f"{live_url}/openapi.json",
        "--checks", "not_a_server_error,response_schema_conformance",
        "--max-examples", str(EXAMPLES), "--seed", str(SEED),
        "--exclude-method", "DELETE", "--exclude-path-regex", "^/api/(pull|push)$",
        "--request-timeout", "90", "--no-color",
    ]  # fmt: skip
    run = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=900)
    report = run.stdout + run.stderr
    print(report[-1500:])
    assert run.returncode == 0, report
    tested = re.search(r"Tested: (\d+)", report)
    assert tested is not None and int(tested.group(1)) >= 25, report
