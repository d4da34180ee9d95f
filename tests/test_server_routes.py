"""The app in-process over fakeredis, with the real job function run by a thread standing in for
a worker: routing, dispatch, errors, limits and auth without starting any process."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import fakeredis
import pytest
import redis
from fastapi.testclient import TestClient
from rq import Queue
from rq.registry import FailedJobRegistry
from rq.serializers import JSONSerializer
from rq.timeouts import TimerDeathPenalty
from rq.worker import SimpleWorker

from ollm.contract import Keys
from ollm.engine.echo import EchoEngine
from ollm.errors import OllmError
from ollm.generation import ChatMessage, EmbeddingRequest, EmbeddingResult, GenerationRequest
from ollm.settings import Settings
from server.app import create_app
from server.dispatch import Dispatcher
from server.services import Services
from server.stores.responses import response_store
from server.stores.sessions import session_store
from workers import job as job_module
from workers.heartbeat import Heartbeat
from workers.job import GENERATE_JOB, JobContext


class LengthEmbedder:
    def embed(self, request: EmbeddingRequest) -> EmbeddingResult:
        texts = [str(item) for item in request.inputs]
        return EmbeddingResult(model=request.model, embeddings=[[float(len(t))] for t in texts], prompt_tokens=2)


class FakeWorker:
    """Runs queued jobs through RQ and the real job function, like `ollm worker` minus the process."""

    def __init__(self, sync: redis.Redis, keys: Keys) -> None:
        self.engine = EchoEngine()
        self.context = JobContext(sync, keys, {"echo": self.engine}, {"lengths": LengthEmbedder()})
        self.queues = [
            Queue(keys.queue(model), connection=sync, serializer=JSONSerializer) for model in ("echo", "lengths")
        ]
        self.rq = SimpleWorker(self.queues, connection=sync, serializer=JSONSerializer)
        self.rq.death_penalty_class = TimerDeathPenalty
        self.heartbeat = Heartbeat(
            sync, keys, "fake", ["echo", "lengths"], 4, interval=0.2, in_flight=self.context.in_flight
        )
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> FakeWorker:
        job_module.install(self.context)
        self.heartbeat.start()
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self.heartbeat.stop()
        job_module.install(None)
        self.context.close()
        self.engine.close()

    def _run(self) -> None:
        while not self._stop.is_set():
            connection = self.queues[0].connection
            found = Queue.dequeue_any(self.queues, None, connection=connection, serializer=JSONSerializer)
            if found is None:
                self._stop.wait(0.01)
                continue
            job, queue = found
            # RQ's own bookkeeping (status, result, registries), as in GenerationWorker's threads.
            self.rq.perform_job(job, queue, self.rq.prepare_execution(job))


@pytest.fixture
def settings(clean_settings_env: Path) -> Settings:
    return Settings(
        redis={"url": "redis://fake", "namespace": "unit"},
        server={"worker_lost_seconds": 5.0, "max_request_bytes": 2048, "api_key": None},
    )


def services_for(settings: Settings) -> Services:
    server = fakeredis.FakeServer()
    sync = fakeredis.FakeRedis(server=server)
    connection = fakeredis.FakeAsyncRedis(server=server)
    keys = Keys(settings.redis.namespace)
    return Services(
        settings=settings, keys=keys, sync=sync, connection=connection,
        dispatcher=Dispatcher(settings, sync, connection),
        responses=response_store(settings.server, connection, keys),
        sessions=session_store(settings.server, connection, keys),
    )  # fmt: skip


@pytest.fixture
def services(settings: Settings) -> Services:
    return services_for(settings)


@pytest.fixture
def client(settings: Settings, services: Services) -> Iterator[TestClient]:
    with TestClient(create_app(settings, services)) as test_client:
        yield test_client


@pytest.fixture
def worker(services: Services) -> Iterator[FakeWorker]:
    fake = FakeWorker(services.sync, services.keys).start()
    yield fake
    fake.stop()


CHAT = {"model": "echo", "messages": [{"role": "user", "content": "in process"}]}


def test_chat_completion_through_the_queue(client: TestClient, worker: FakeWorker) -> None:
    answer = client.post("/v1/chat/completions", json=CHAT)
    assert answer.status_code == 200, answer.text
    assert answer.json()["choices"][0]["message"]["content"] == "in process"
    with client.stream("POST", "/v1/chat/completions", json={**CHAT, "stream": True}) as response:
        lines = [line for line in response.iter_lines() if line]
    assert lines[-1] == "data: [DONE]" and len(lines) == 2 + 2 + 1  # role, 2 tokens, finish, DONE


def test_embeddings_go_through_the_same_job_path(services: Services, worker: FakeWorker) -> None:
    result = asyncio.run(services.dispatcher.embed(EmbeddingRequest(model="lengths", inputs=["ab", "abcd"])))
    assert result.embeddings == [[2.0], [4.0]]
    with pytest.raises(OllmError, match="no live worker serves model 'all-minilm-l6-v2'"):
        asyncio.run(services.dispatcher.embed(EmbeddingRequest(model="all-minilm-l6-v2", inputs=["x"])))
    with pytest.raises(OllmError, match="nope") as unknown:
        asyncio.run(services.dispatcher.embed(EmbeddingRequest(model="nope", inputs=["x"])))
    assert unknown.value.status == 404


def test_no_live_worker_is_503_naming_the_model(client: TestClient) -> None:
    answer = client.post("/v1/chat/completions", json=CHAT)
    assert answer.status_code == 503
    assert answer.json()["error"]["message"].startswith("no live worker serves model 'echo'")


def test_health_lists_workers_per_model(client: TestClient, worker: FakeWorker) -> None:
    health = client.get("/v1/health").json()
    assert health["status"] == "ok"
    serving = {"workers": 1, "hosts": [worker.heartbeat._static["host"]], "in_flight": 0, "loading": []}
    assert health["models"] == {"echo": serving, "lengths": serving}


async def enqueue_unwatched(dispatcher: Dispatcher, request: GenerationRequest) -> None:
    """Enqueue a generation the way dispatch does, with nobody subscribed to its events."""
    queue = await dispatcher._queue(request.model)
    payload = request.model_dump(mode="json")
    await dispatcher._write(dispatcher._job_writes(queue, request.model, request.id, GENERATE_JOB, payload))


def test_a_job_whose_worker_stopped_beating_is_failed(services: Services) -> None:
    dispatcher = services.dispatcher
    request = GenerationRequest(model="echo", messages=[ChatMessage(role="user", content="x")])
    asyncio.run(enqueue_unwatched(dispatcher, request))
    queue = Queue(services.keys.queue("echo"), connection=services.sync, serializer=JSONSerializer)
    found = Queue.dequeue_any([queue], None, connection=services.sync, serializer=JSONSerializer)
    assert found is not None
    job = found[0]
    with services.sync.pipeline() as pipe:
        job.prepare_for_execution("gone-worker", pipe)  # started by a worker that never beats
        pipe.execute()
    ending: dict[str, Any] | None = asyncio.run(dispatcher.check_job(request.id, "echo"))
    assert ending is not None and ending["code"] == "worker_lost" and ending["status"] == 503
    assert request.id in FailedJobRegistry(queue.name, connection=services.sync).get_job_ids()


def test_validation_errors_use_the_openai_error_body(client: TestClient) -> None:
    answer = client.post("/v1/chat/completions", json={"model": "echo", "messages": "nope"})
    assert answer.status_code == 422
    error = answer.json()["error"]
    assert error["param"] == "messages" and error["type"] == "invalid_request_error"
    assert client.post("/v1/sessions/x/prompt", json={}).json()["error"]["param"] == "prompt"


def test_body_too_large_is_413(client: TestClient) -> None:
    big = {**CHAT, "messages": [{"role": "user", "content": "x" * 4096}]}
    answer = client.post("/v1/chat/completions", json=big)
    assert answer.status_code == 413 and answer.json()["error"]["code"] == "request_too_large"

    def chunks() -> Iterator[bytes]:
        yield b'{"model": "echo", "messages": [{"role": "user", "content": "'
        for _ in range(10):
            yield b"y" * 512
        yield b'"}]}'

    chunked = client.post("/v1/chat/completions", content=chunks(), headers={"content-type": "application/json"})
    assert chunked.status_code == 413
    ollama = client.post("/api/chat", json=big)
    assert ollama.status_code == 413 and "server.max_request_bytes" in ollama.json()["error"]


def test_api_key_guards_everything_but_health(settings: Settings) -> None:
    settings.server.api_key = "k"
    with TestClient(create_app(settings, services_for(settings))) as client:
        assert client.get("/v1/health").status_code == 200
        assert client.get("/docs").status_code == 401
        assert client.get("/docs", headers={"Authorization": "Bearer k"}).status_code == 200
        refused = client.get("/api/tags")
        assert refused.status_code == 401 and "API key" in refused.json()["error"]


def test_a_final_event_missed_on_pub_sub_is_read_from_the_job_result(
    services: Services, worker: FakeWorker
) -> None:
    # Enqueued without a subscriber: as if the subscription dropped while the job ran.
    request = GenerationRequest(model="echo", messages=[ChatMessage(role="user", content="read back")])
    asyncio.run(enqueue_unwatched(services.dispatcher, request))
    queue = Queue(services.keys.queue("echo"), connection=services.sync, serializer=JSONSerializer)
    deadline = time.monotonic() + 5
    while request.id not in queue.finished_job_registry.get_job_ids():
        assert time.monotonic() < deadline, "the job did not finish"
        time.sleep(0.01)
    ending = asyncio.run(services.dispatcher.check_job(request.id, "echo"))
    assert ending is not None and ending["type"] == "final" and ending["text"] == "read back"


def test_a_request_that_outlives_its_timeout_is_504_and_cancelled(settings: Settings) -> None:
    settings.server.request_timeout_seconds = 0.5
    services = services_for(settings)
    # A live worker that never picks the job up.
    Heartbeat(services.sync, services.keys, "stuck", ["echo"], 1, interval=60, in_flight=lambda: 0).beat()
    with TestClient(create_app(settings, services)) as client:
        answer = client.post("/v1/chat/completions", json=CHAT)
    # Ended by its own timeout (no worker ever takes the job): the 504's code says which.
    assert answer.status_code == 504 and answer.json()["error"]["code"] == "timeout"
    (marker,) = services.sync.keys(f"{services.keys.namespace}:cancelled:*")
    job_id = marker.decode().rsplit(":", 1)[1]
    queue = Queue(services.keys.queue("echo"), connection=services.sync, serializer=JSONSerializer)
    assert job_id not in queue.get_job_ids()  # the queued job was cancelled, not left to run


def test_plan_route_shows_the_memory_estimate(
    settings: Settings, make_model_dir: Any, clean_settings_env: Path, tmp_path: Path
) -> None:
    config = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "max_position_embeddings": 512,
        "num_hidden_layers": 2, "hidden_size": 8, "num_attention_heads": 2, "intermediate_size": 16,
        "vocab_size": 10,
    }  # fmt: skip
    settings.runtime.models_dir = tmp_path  # the server plans directories under its models dir only
    make_model_dir(tmp_path / "tiny-llama", config, {"embed.weight": (10, 8)})
    with TestClient(create_app(settings, services_for(settings))) as client:
        model = str(tmp_path / "tiny-llama")
        body = {"model": model, "dtype": "float32", "memory_budget": "1GiB", "context_tokens": 100}
        answer = client.post("/v1/plan", json=body)
        plan = answer.json()
        assert answer.status_code == 200, plan
        assert plan["memory"]["budget_bytes"] == 2**30 and plan["memory"]["weights_bytes"] == 10 * 8 * 4
        assert plan["memory"]["kv_cache_tokens"] == 100 and plan["memory"]["strategy"] == "resident"
        bad = client.post("/v1/plan", json={"model": model, "memory_budget": "a lot"})
        assert bad.status_code == 422 and bad.json()["error"]["param"] == "memory_budget"
