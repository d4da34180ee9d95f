"""`ollm worker` runs the optimized path under the same settings as the CLI: a worker told (through
the environment, as a deployment would) to stream its layers and offload its KV cache answers the
same greedy text as a resident worker, and says which passes applied."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.integration.conftest import ServerFactory, WorkerFactory
from tests.integration.harness import new_namespace

pytestmark = pytest.mark.slow

MODEL = "smollm2-135m-instruct"
QUESTION = {"prompt": "What is the capital of France?", "max_new_tokens": 16, "temperature": 0}


def _answer(start_server: ServerFactory, start_worker: WorkerFactory, **env: str) -> dict[str, object]:
    namespace = new_namespace()
    server = start_server(ns=namespace)
    start_worker(MODEL, ns=namespace, OLLM_RUNTIME__DTYPE="float32", **env).wait_ready(timeout=300)
    with server.client() as client:
        response = client.post("/v1/prompt", json={"model": MODEL, **QUESTION}, timeout=120)
    assert response.status_code == 200, response.text
    answer: dict[str, object] = response.json()
    return answer


def test_a_worker_streams_layers_and_offloads_kv_from_its_settings(
    default_model_dir: Path, tmp_path: Path, start_server: ServerFactory, start_worker: WorkerFactory
) -> None:
    resident = _answer(start_server, start_worker)
    optimized = _answer(
        start_server,
        start_worker,
        OLLM_RUNTIME__LAYER_STREAMING="on",
        OLLM_RUNTIME__KV_OFFLOAD="on",
        OLLM_RUNTIME__KV_OFFLOAD_DIR=str(tmp_path / "kv"),
    )
    assert optimized["text"] == resident["text"]
    execution = optimized["execution"]
    assert isinstance(execution, dict)
    assert execution["backend"] == "optimized-native"
    assert execution["applied_passes"] == ["llama.sdpa-attention", "llama.layer-offload", "llama.kv-offload"]
    assert resident["execution"]["applied_passes"] == ["llama.sdpa-attention"]  # type: ignore[index]
