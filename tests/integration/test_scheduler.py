"""Every model a user can name is served on demand: real Redis, real workers, the real models.

Workers started without `--model` load what requests ask for, within their memory budget; the
server places each load on one worker through Redis.
"""

from __future__ import annotations

import concurrent.futures
import threading
from pathlib import Path
from typing import Any

import httpx
import ollama
import pytest
import redis

from ollm.contract import Keys, LoadRequest
from ollm.plan import plan_model
from ollm.settings import RuntimeSettings
from tests.conftest import DEFAULT_CHAT_MODEL, DEFAULT_EMBEDDING_MODEL
from tests.integration.conftest import ServerFactory, WorkerFactory
from tests.integration.harness import (
    OLLM,
    Process,
    Server,
    base_env,
    free_port,
    link_model,
    new_namespace,
    wait_until,
)
from workers.redis_server import RedisServer

pytestmark = pytest.mark.slow

LOST_AFTER = 2.0
HELLO = [{"role": "user", "content": "Name a colour."}]


def estimate(model: str, runtime: RuntimeSettings) -> int:
    """What a loaded copy counts on a worker, and what the scheduler sizes it by before loading:
    the expected peak of the worker's plan (the test's workers run the default batch and step)."""
    peak = plan_model(model, runtime).expected_peak_bytes()
    assert peak is not None
    return peak


def workers(server: Server) -> list[dict[str, Any]]:
    found: list[dict[str, Any]] = httpx.get(f"{server.url}/v1/health", timeout=10).json()["workers"]
    return found


def running(server: Server) -> list[str]:
    return [m["name"] for m in httpx.get(f"{server.url}/api/ps", timeout=10).json()["models"]]


def chat(client: httpx.Client, model: str, **extra: Any) -> dict[str, Any]:
    body = {"model": model, "messages": HELLO, "stream": False, "options": {"num_predict": 4, "temperature": 0}}
    answer = client.post("/api/chat", json={**body, **extra})
    assert answer.status_code == 200, answer.text
    reply: dict[str, Any] = answer.json()
    return reply


def test_fresh_serve_answers_the_default_embedding_and_chat_models(
    tmp_path: Path, default_model_dir: Path, embedding_model_dir: Path
) -> None:
    port = free_port()
    serve = Process(
        [*OLLM, "serve", "--port", str(port), "--log-level", "warning"],
        base_env(new_namespace(), TMPDIR=str(tmp_path)),
        tmp_path / "serve.log",
    )
    url = f"http://127.0.0.1:{port}"
    try:

        def healthy() -> bool:
            assert serve.alive(), serve.output()
            try:
                return DEFAULT_CHAT_MODEL in httpx.get(f"{url}/v1/health", timeout=2).json()["models"]
            except (httpx.TransportError, KeyError):
                return False

        wait_until(healthy, 300, "the embedded stack", interval=0.2)
        with httpx.Client(base_url=url, timeout=300) as client:
            v1 = client.post("/v1/embeddings", json={"model": DEFAULT_EMBEDDING_MODEL, "input": "hi"})
            assert v1.status_code == 200, v1.text
            vector = v1.json()["data"][0]["embedding"]
            embed = client.post("/api/embed", json={"model": DEFAULT_EMBEDDING_MODEL, "input": "hi"})
            assert embed.status_code == 200, embed.text
            legacy = client.post("/api/embeddings", json={"model": DEFAULT_EMBEDDING_MODEL, "prompt": "hi"})
            assert legacy.status_code == 200, legacy.text
            assert len(vector) == len(embed.json()["embeddings"][0]) == len(legacy.json()["embedding"]) > 0
            answer = client.post("/v1/chat/completions", json={"model": DEFAULT_CHAT_MODEL, "messages": HELLO})
            assert answer.status_code == 200 and answer.json()["choices"][0]["message"]["content"].strip()
            # The same worker holds both: the chat model it was started with and the one loaded on demand.
            (worker,) = client.get("/v1/health").json()["workers"]
            assert {DEFAULT_CHAT_MODEL, DEFAULT_EMBEDDING_MODEL} <= set(worker["models"])
            assert worker["pinned"] == [DEFAULT_CHAT_MODEL]
    finally:
        serve.stop(timeout=30)


def test_a_derived_model_answers_every_family_like_its_base_with_its_system_prompt(
    default_model_dir: Path, start_worker: WorkerFactory, start_server: ServerFactory
) -> None:
    start_worker(DEFAULT_CHAT_MODEL)
    server = start_server()
    client = ollama.Client(host=server.url)
    system = "You are a pirate. Answer in one short sentence."
    client.create(model="pirate", from_=DEFAULT_CHAT_MODEL, system=system, parameters={"num_predict": 6})
    openai = server.openai_client()

    assert "pirate" in [m.id for m in openai.models.list()]
    derived = openai.chat.completions.create(model="pirate", messages=HELLO, temperature=0)  # type: ignore[arg-type]
    base = openai.chat.completions.create(
        model=DEFAULT_CHAT_MODEL,
        messages=[{"role": "system", "content": system}, *HELLO],  # type: ignore[list-item]
        temperature=0,
        max_tokens=6,
    )
    assert derived.model == "pirate"
    assert derived.choices[0].message.content == base.choices[0].message.content
    assert derived.usage is not None and derived.usage.completion_tokens <= 6  # the derived num_predict
    assert derived.usage.prompt_tokens == base.usage.prompt_tokens  # type: ignore[union-attr]

    completion = openai.completions.create(model="pirate", prompt="The sea is", temperature=0)
    assert completion.usage is not None and completion.usage.completion_tokens <= 6
    response = openai.responses.create(model="pirate", input="Name a colour.", temperature=0)
    assert response.model == "pirate" and response.output_text == base.choices[0].message.content
    with server.client() as http:
        native = http.post("/v1/prompt", json={"model": "pirate", "prompt": "Name a colour.", "temperature": 0})
        assert native.status_code == 200, native.text

    # Deleted while a request runs (streaming: the server answers once its first token is out),
    # that request still finishes.
    stream = openai.chat.completions.create(model="pirate", messages=HELLO, temperature=0, stream=True)  # type: ignore[arg-type]
    client.delete("pirate")
    chunks = list(stream)
    assert chunks[-1].choices[0].finish_reason in ("stop", "length")
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == base.choices[0].message.content
    with pytest.raises(Exception) as gone:
        openai.chat.completions.create(model="pirate", messages=HELLO)  # type: ignore[arg-type]
    assert getattr(gone.value, "status_code", None) == 404


def test_a_budget_for_one_model_evicts_and_reloads_when_alternating(
    default_model_dir: Path,
    embedding_model_dir: Path,
    default_runtime: RuntimeSettings,
    start_worker: WorkerFactory,
    start_server: ServerFactory,
) -> None:
    chat_size = estimate(DEFAULT_CHAT_MODEL, default_runtime)
    embed_size = estimate(DEFAULT_EMBEDDING_MODEL, default_runtime)
    # Either model fits alone; both together do not.
    budget = chat_size + embed_size // 4
    start_worker(OLLM_WORKER__MEMORY_BUDGET=str(budget))
    server = start_server()
    with httpx.Client(base_url=server.url, timeout=300) as client:
        for _round in range(2):
            answer = chat(client, DEFAULT_CHAT_MODEL)
            assert answer["load_duration"] > 0  # loaded for this request
            assert running(server) == [f"{DEFAULT_CHAT_MODEL}:latest"]
            again = chat(client, DEFAULT_CHAT_MODEL)
            assert again["load_duration"] == 0  # warm
            embedded = client.post("/api/embed", json={"model": DEFAULT_EMBEDDING_MODEL, "input": "x"})
            assert embedded.status_code == 200, embedded.text
            assert running(server) == [f"{DEFAULT_EMBEDDING_MODEL}:latest"]
        (worker,) = workers(server)
        assert worker["loads"] == 4 and worker["memory_used"] <= budget
        ps = client.get("/api/ps").json()["models"][0]
        assert 0 < ps["size"] <= embed_size and ps["expires_at"]


def test_eight_concurrent_first_requests_cause_one_load(
    start_worker: WorkerFactory, start_server: ServerFactory
) -> None:
    # Loading the echo model takes a second here: time for all eight to arrive while it loads.
    for _ in range(2):
        start_worker(OLLM_ECHO_LOAD_DELAY="1")
    # Eight waiting requests are also a queue deep enough for a replica (replica_queue_depth 8):
    # replicas off, so any second load is a placement race.
    server = start_server(OLLM_SERVER__REPLICA_QUEUE_DEPTH="0")
    openai = server.openai_client()

    def ask(index: int) -> str | None:
        reply = openai.chat.completions.create(model="echo", messages=[{"role": "user", "content": f"n{index}"}])
        return reply.choices[0].message.content

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(ask, range(8)))
    assert answers == [f"n{i}" for i in range(8)]
    found = workers(server)
    assert sum(w["loads"] for w in found) == 1
    assert [w["models"] for w in found].count(["echo"]) == 1


def test_a_pinned_model_is_never_evicted_and_a_model_too_large_fails_at_once(
    default_model_dir: Path,
    embedding_model_dir: Path,
    default_runtime: RuntimeSettings,
    start_worker: WorkerFactory,
    start_server: ServerFactory,
) -> None:
    chat_size = estimate(DEFAULT_CHAT_MODEL, default_runtime)
    # Room for the pinned chat model only: the embedding model could fit only by evicting it.
    start_worker(DEFAULT_CHAT_MODEL, OLLM_WORKER__MEMORY_BUDGET=str(chat_size))
    server = start_server()
    with httpx.Client(base_url=server.url, timeout=60) as client:
        refused = client.post("/v1/embeddings", json={"model": DEFAULT_EMBEDDING_MODEL, "input": "x"})
        assert refused.status_code == 503, refused.text
        message = refused.json()["error"]["message"]
        assert DEFAULT_EMBEDDING_MODEL in message and "GiB" in message and "pinned" in message
        ollama_shape = client.post("/api/embed", json={"model": DEFAULT_EMBEDDING_MODEL, "input": "x"})
        assert ollama_shape.status_code == 503 and set(ollama_shape.json()) == {"error"}
        assert "GiB" in ollama_shape.json()["error"]
        assert running(server) == [f"{DEFAULT_CHAT_MODEL}:latest"]
        assert chat(client, DEFAULT_CHAT_MODEL)["message"]["content"]
        assert workers(server)[0]["loads"] == 1  # its start-up load only: never evicted, never reloaded

    # A worker whose whole budget is smaller than the model: no load is even tried.
    tiny = start_worker(ns=new_namespace(), OLLM_WORKER__MEMORY_BUDGET="10MB")
    other = start_server(ns=tiny.namespace)
    # Its plans of the models here (made just after it registers) are what the server sizes by.
    wait_until(lambda: workers(other)[0]["peaks"], 60, "the worker to publish its planned peaks")
    with httpx.Client(base_url=other.url, timeout=60) as client:
        too_large = client.post("/v1/chat/completions", json={"model": DEFAULT_CHAT_MODEL, "messages": HELLO})
        assert too_large.status_code == 503
        message = too_large.json()["error"]["message"]
        assert f"{chat_size / 2**30:.2f} GiB" in message and "0.01 GiB" in message
        assert workers(other)[0]["loads"] == 0


def test_a_worker_killed_while_loading_fails_the_waiting_requests_and_another_loads(
    start_worker: WorkerFactory, start_server: ServerFactory, redis_server: RedisServer, namespace: str
) -> None:
    loaders = [start_worker(OLLM_ECHO_LOAD_DELAY="8") for _ in range(2)]
    server = start_server(OLLM_SERVER__WORKER_LOST_SECONDS=str(LOST_AFTER))
    results: dict[str, httpx.Response] = {}

    def ask() -> None:
        body = {"model": "echo", "messages": [{"role": "user", "content": "hi"}]}
        results["answer"] = httpx.post(f"{server.url}/v1/chat/completions", json=body, timeout=120)

    asker = threading.Thread(target=ask)
    asker.start()
    connection = redis.Redis.from_url(redis_server.url)
    try:
        raw = wait_until(lambda: connection.get(Keys(namespace).load_claim("echo")), 30, "the load to be placed")
        claim = LoadRequest.model_validate_json(raw)
        victim = next(w for w in loaders if w.registered_name() == claim.worker)
        victim.kill9()
        asker.join(timeout=60)
        answer = results["answer"]
        assert answer.status_code == 503 and answer.json()["error"]["code"] == "worker_lost", answer.text
        # The load was placed again, on the worker still alive.
        retried = wait_until(lambda: connection.get(Keys(namespace).load_claim("echo")), 30, "the retried load")
        assert LoadRequest.model_validate_json(retried).worker != claim.worker
    finally:
        connection.close()


def test_names_that_are_no_servable_model_are_client_errors(
    start_worker: WorkerFactory, start_server: ServerFactory
) -> None:
    start_worker()
    server = start_server()
    cases = [("/etc", 400), ("../../etc/passwd", 400), ("no-such-model-anywhere", 404), ("openai/gpt-4o", 400)]
    with server.client() as client:
        for model, status in cases:
            answer = client.post("/v1/chat/completions", json={"model": model, "messages": HELLO})
            assert answer.status_code == status, (model, answer.text)
            assert set(answer.json()["error"]) == {"message", "type", "param", "code"}, model
            api = client.post("/api/chat", json={"model": model, "messages": HELLO})
            assert 400 <= api.status_code < 500 and set(api.json()) == {"error"}, (model, api.text)


def test_a_deep_queue_gets_a_replica_on_a_second_worker(
    start_worker: WorkerFactory, start_server: ServerFactory
) -> None:
    # One request at a time per worker, 50 ms a token: requests pile up in the model's queue.
    for _ in range(2):
        start_worker(OLLM_WORKER__MAX_BATCH="1", OLLM_ECHO_TOKEN_DELAY="0.05")
    server = start_server(OLLM_SERVER__REPLICA_QUEUE_DEPTH="2")
    openai = server.openai_client()
    words = " ".join(f"w{i}" for i in range(20))

    def ask(_: int) -> str | None:
        reply = openai.chat.completions.create(model="echo", messages=[{"role": "user", "content": words}])
        return reply.choices[0].message.content

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(ask, range(8)))
    assert answers == [words] * 8
    found = workers(server)
    assert [w["models"] for w in found] == [["echo"], ["echo"]]  # one copy on each, never two on one
    assert sum(w["loads"] for w in found) == 2


def test_one_model_named_two_ways_is_loaded_once(
    embedding_model_dir: Path, start_worker: WorkerFactory, start_server: ServerFactory
) -> None:
    start_worker()
    server = start_server()
    openai = server.openai_client()
    # Its alias, then its directory: the same files, so the worker serves the second name from the
    # copy it already holds.
    for name in (DEFAULT_EMBEDDING_MODEL, str(embedding_model_dir)):
        assert len(openai.embeddings.create(model=name, input="hi").data[0].embedding) == 384
    (worker,) = workers(server)
    assert worker["loads"] == 1


def test_a_directory_dropped_into_models_dir_answers_to_its_name(
    tmp_path: Path, default_model_dir: Path, start_worker: WorkerFactory, start_server: ServerFactory
) -> None:
    models = tmp_path / "models"
    # Its manifest came along (it names the alias, stored elsewhere): the directory's name still counts.
    link_model(default_model_dir, models / "smol")
    link_model(default_model_dir, models / "Echo")  # named like the built-in echo: a clash
    env = {"OLLM_RUNTIME__MODELS_DIR": str(models)}
    start_worker(**env)
    server = start_server(**env)
    path = str(models / "smol")

    tags = [m.model for m in ollama.Client(host=server.url).list().models]
    assert "smol:latest" in tags and f"{path}:latest" not in tags
    assert f"{models / 'Echo'}:latest" in tags  # the clash is listed by its path, which works
    openai = server.openai_client()
    assert "smol" in [m.id for m in openai.models.list()]

    client = ollama.Client(host=server.url)
    options = {"num_predict": 4, "temperature": 0}
    by_name = client.chat(model="smol:latest", messages=HELLO, options=options).message.content
    assert by_name and by_name.strip()
    for name in ("smol", path):  # OpenAI's clients, by name and by path: the same greedy reply
        reply = openai.chat.completions.create(model=name, messages=HELLO, max_tokens=4, temperature=0)  # type: ignore[arg-type]
        assert reply.choices[0].message.content == by_name
    assert client.show("smol").details.family == "llama"
    (worker,) = workers(server)
    assert {"smol", path} <= set(worker["models"]) and worker["loads"] == 1  # one copy under both names
    with pytest.raises(ollama.ResponseError) as hidden:  # a created model would hide the directory
        client.copy("smol", "smol:latest")
    assert hidden.value.status_code == 400 and "is the model directory" in hidden.value.error

    # The alias the directory clashes with is refused, saying why and what to do, in each family's shape.
    with pytest.raises(ollama.ResponseError) as refused:
        client.chat(model="echo", messages=HELLO)
    assert refused.value.status_code == 409 and "rename the directory" in refused.value.error
    with server.client() as http:
        answer = http.post("/v1/chat/completions", json={"model": "ECHO", "messages": HELLO})
        assert answer.status_code == 409, answer.text
        assert answer.json()["error"]["code"] == "model_name_clash"
