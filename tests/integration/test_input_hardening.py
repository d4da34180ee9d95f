"""Schemathesis fuzzes every operation of /openapi.json against a live stack: no input gets a 5xx,
and every answer matches the schema the server publishes.

The stack is real: a redis-server, one worker serving the echo model (generation routes, fast)
and the real all-minilm-l6-v2 embedding model (embedding routes), and `ollm serve` whose default
models are those two (and whose models dir is empty), so a 503 would mean the service is broken. Deleting operations
and the registry ones (pull, push) are left out: they would remove or fetch models. The seed is
fixed (hypothesis' derandomize) and the example count bounded.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import quote

import httpx
import pytest

from tests.conftest import DEFAULT_EMBEDDING_MODEL
from tests.integration.harness import Server, Worker, new_namespace
from workers.redis_server import RedisServer

pytestmark = pytest.mark.slow

# Per operation and phase, over about 30 operations: 30 took 48 s alone on two cores (87 s beside
# the rest of the suite), 12 about 20 s; the boundary ("coverage") phase tries each field's edge
# values whatever the count, and the hand-written CASES below cover the known attacks.
EXAMPLES = 12
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
        OLLM_RUNTIME__MODELS_DIR=str(logs / "models"), OLLM_SERVER__FILES_DIR=str(logs / "files"), **defaults,
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


LONE = '"\\ud800 hi"'  # valid JSON, not valid Unicode
ODD_NAMES = ["~s/", "~root/x", "../../etc/passwd", "/etc/passwd", "/", "bad\x00name", "x" * 5000]

# (method, path, raw JSON body or None): the cases and their relatives.
CASES = [
    ("POST", "/v1/chat/completions", f'{{"model": "echo", "messages": [{{"role": "user", "content": {LONE}}}]}}'),
    ("POST", "/v1/completions", f'{{"model": "echo", "prompt": {LONE}}}'),
    ("POST", "/v1/responses", f'{{"model": "echo", "input": {LONE}}}'),
    ("POST", "/v1/embeddings", f'{{"model": "{DEFAULT_EMBEDDING_MODEL}", "input": {LONE}}}'),
    ("POST", "/api/generate", f'{{"model": "echo", "prompt": {LONE}}}'),
    ("POST", "/api/chat", f'{{"model": "echo", "messages": [{{"role": "user", "content": {LONE}}}]}}'),
    ("POST", "/api/embed", f'{{"model": "{DEFAULT_EMBEDDING_MODEL}", "input": {LONE}}}'),
    ("POST", "/api/embeddings", f'{{"model": "{DEFAULT_EMBEDDING_MODEL}", "prompt": {LONE}}}'),
    ("POST", "/v1/completions", '{"model": "echo", "prompt": ["a", "b", "c", "d", "e"], "n": 16}'),
    ("POST", "/v1/chat/completions", '{"model": "echo", "messages": [], "max_tokens": -1}'),
    ("POST", "/v1/chat/completions", '{"model": "echo", "messages": [{"role": "user", "content": "hi"}], "n": 1e30}'),
    ("POST", "/api/generate", '{"model": "echo", "prompt": "hi", "keep_alive": "99999999999999h"}'),
    ("POST", "/api/embed", f'{{"model": "{DEFAULT_EMBEDDING_MODEL}", "input": "hi", "keep_alive": 1e308}}'),
    ("POST", "/api/generate", '{"model": "echo", "prompt": "hi", "options": {"seed": 123456789012345678901234567890}}'),
    ("GET", "/v1/responses/..%2F..%2Fetc%2Fpasswd", None),
    ("GET", "/v1/responses/resp%00x", None),
    ("GET", "/v1/sessions/" + "s" * 300, None),
    ("POST", "/v1/responses", '{"model": "echo", "input": "hi", "previous_response_id": "../../x"}'),
    *[("POST", "/api/generate", json.dumps({"model": name, "prompt": "hi"})) for name in ODD_NAMES],
    *[("POST", "/api/show", json.dumps({"model": name})) for name in ODD_NAMES],
    *[("POST", "/api/create", json.dumps({"model": name, "from": "echo"})) for name in ODD_NAMES],
    *[("POST", "/v1/chat/completions", json.dumps({"model": name, "messages": []})) for name in ODD_NAMES],
    *[("POST", "/v1/embeddings", json.dumps({"model": name, "input": "hi"})) for name in ODD_NAMES],
    *[("POST", "/v1/plan", json.dumps({"model": name})) for name in ODD_NAMES],
    *[("GET", f"/v1/ollm/models/{quote(name)}", None) for name in ODD_NAMES],
]


@pytest.mark.parametrize(("method", "path", "body"), CASES, ids=[f"{m} {p[:40]} {(b or '')[:50]}" for m, p, b in CASES])
def test_adversarial_input_is_a_4xx_in_the_familys_shape(
    live_url: str, method: str, path: str, body: str | None
) -> None:
    headers = {"content-type": "application/json"}
    answer = httpx.request(method, f"{live_url}{path}", content=body, headers=headers, timeout=60)
    assert 400 <= answer.status_code < 500, answer.text
    error = answer.json()["error"]
    if path.startswith("/api/"):
        assert isinstance(error, str) and error
    else:
        assert error["message"] and error["type"] == "invalid_request_error"


def test_nothing_outside_models_dir_is_read_or_written(live_url: str, tmp_path: Path) -> None:
    # A directory that looks like a model, outside the server's models dir: a client cannot use it.
    outside = tmp_path / "outside-model"
    outside.mkdir()
    (outside / "config.json").write_text('{"model_type": "llama", "architectures": ["LlamaForCausalLM"]}')
    for path, body in [("/api/show", {"model": str(outside)}), ("/v1/plan", {"model": str(outside)})]:
        answer = httpx.post(f"{live_url}{path}", json=body, timeout=30)
        assert answer.status_code in (400, 404), answer.text
        assert "llama" not in answer.text.lower()
    answer = httpx.post(f"{live_url}/api/create", json={"model": "../../escape", "from": "echo"}, timeout=30)
    assert answer.status_code == 400
    assert not (tmp_path / "escape").exists()
