"""Prometheus metrics without processes: the cluster collector (worker records in Redis -> gauges),
the per-job observer (event times -> histograms) and the request counter's route labels."""

from __future__ import annotations

import asyncio
from pathlib import Path

import fakeredis
import pytest
from fastapi.testclient import TestClient
from prometheus_client import CollectorRegistry
from prometheus_client.core import Metric
from prometheus_client.exposition import generate_latest
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample
from rq import Queue
from rq.serializers import JSONSerializer

from ollm.contract import Keys, LoadedModel, WorkerInfo
from ollm.engine.echo import EchoEngine
from ollm.generation import ChatMessage, GenerationRequest
from ollm.settings import Settings
from server.app import create_app
from server.metrics.cluster import ClusterState, WorkerState, cluster_families, read_cluster
from server.metrics.instruments import Metrics
from tests.test_server_routes import services_for
from workers.heartbeat import Heartbeat
from workers.keep_alive import KeepAliveSweeper
from workers.residency import Residency

KEYS = Keys("metrics")


def exposed(families: list[Metric]) -> dict[str, list[Sample]]:
    """The samples a scraper parses out of the text exposition of ``families``, by metric name."""

    class Families:
        def collect(self) -> list[Metric]:
            return families

    text = generate_latest(Families()).decode()
    return {family.name: family.samples for family in text_string_to_metric_families(text)}


def value(samples: list[Sample], **labels: str) -> float:
    matching = [s.value for s in samples if all(s.labels.get(k) == v for k, v in labels.items())]
    assert len(matching) == 1, (labels, samples)
    return matching[0]


def test_worker_records_become_gauges_named_by_worker() -> None:
    busy = WorkerInfo(
        name="gpu-1", host="box", pid=42, models=["echo", "smol"], in_flight=3, max_batch=8, started_at=1000.0,
        age_seconds=0.4, on_demand=True, memory_budget=8 << 30, memory_used=3 << 30, loads=5, dtype="bfloat16",
        running=3, batch_size=2,
    )  # fmt: skip
    # An older worker reports neither running sequences nor batch size; a dead one is still listed.
    old = WorkerInfo(name="old", host="other", pid=7, models=["echo"], age_seconds=9.0)
    state = ClusterState(
        workers=[
            WorkerState(
                busy, up=True,
                loaded={
                    "smol": LoadedModel(names=["smol"], size=270_000_000, in_flight=2, pinned=True),
                    "echo": LoadedModel(names=["echo"], size=0, in_flight=1),
                },
            ),
            WorkerState(old, up=False),
        ],
        queue_depths={"smol": 4, "gone": 0},
    )  # fmt: skip
    samples = exposed(cluster_families(state))
    assert value(samples["ollm_worker_up"], worker="gpu-1") == 1
    assert value(samples["ollm_worker_up"], worker="old") == 0
    assert value(samples["ollm_worker_heartbeat_age_seconds"], worker="old") == 9.0
    assert value(samples["ollm_worker_info"], worker="gpu-1", host="box", pid="42", dtype="bfloat16", on_demand="true")
    assert value(samples["ollm_worker_running_sequences"], worker="gpu-1") == 3
    assert [s.labels["worker"] for s in samples["ollm_worker_running_sequences"]] == ["gpu-1"]
    assert value(samples["ollm_worker_batch_size"], worker="gpu-1") == 2
    assert value(samples["ollm_worker_max_batch_size"], worker="gpu-1") == 8
    assert value(samples["ollm_worker_in_flight_requests"], worker="gpu-1") == 3
    assert value(samples["ollm_worker_memory_budget_bytes"], worker="gpu-1") == 8 << 30
    assert value(samples["ollm_worker_memory_used_bytes"], worker="gpu-1") == 3 << 30
    assert value(samples["ollm_worker_loads"], worker="gpu-1") == 5  # exposed as ollm_worker_loads_total
    assert samples["ollm_worker_loads"][0].name == "ollm_worker_loads_total"
    assert value(samples["ollm_worker_loaded_models"], worker="gpu-1") == 2
    assert value(samples["ollm_worker_loaded_models"], worker="old") == 0
    assert value(samples["ollm_worker_model_memory_bytes"], worker="gpu-1", model="smol", pinned="true") == 270e6
    assert value(samples["ollm_worker_model_in_flight_requests"], worker="gpu-1", model="echo") == 1
    # Only live workers serve; a served model with no queue yet has nothing waiting.
    assert {s.labels["model"]: s.value for s in samples["ollm_model_workers"]} == {"echo": 1, "smol": 1}
    assert {s.labels["model"]: s.value for s in samples["ollm_queue_depth"]} == {"echo": 0, "gone": 0, "smol": 4}


def test_no_workers_no_worker_series() -> None:
    samples = exposed(cluster_families(ClusterState()))
    assert samples["ollm_worker_up"] == [] and samples["ollm_queue_depth"] == []


def test_what_a_worker_publishes_reaches_the_gauges(clean_settings_env: Path) -> None:
    """The real writer (heartbeat + residency) into Redis, read back by the server's collector."""
    server = fakeredis.FakeServer()
    sync = fakeredis.FakeRedis(server=server)
    engine = EchoEngine(token_delay=60.0)  # its one sequence stays in the batch while we look
    residency = Residency.around({"echo": engine}, {}, Settings(), sync, KEYS, budget=1 << 30)
    beat = Heartbeat(
        sync, KEYS, "w1", ["echo"], 4, interval=1.0, in_flight=lambda: 1, status=residency.status
    )  # fmt: skip
    queue = Queue(KEYS.queue("echo"), connection=sync, serializer=JSONSerializer)
    try:
        request = GenerationRequest(model="echo", messages=[ChatMessage(role="user", content="a b c")])
        residency.engines["echo"].submit(request, lambda event: None)
        queue.enqueue("workers.job.generate", {"waiting": 1})
        queue.enqueue("workers.job.generate", {"waiting": 2})
        batch = Queue(KEYS.batch_queue("echo"), connection=sync, serializer=JSONSerializer)
        for line in range(3):
            batch.enqueue("workers.job.generate", {"line": line})
        KeepAliveSweeper(residency, sync, KEYS).sweep()  # publishes the loaded models
        beat.beat()
        state = asyncio.run(read_cluster(fakeredis.FakeAsyncRedis(server=server), KEYS, lost_after=5.0))
    finally:
        engine.cancel(request.id)
        engine.close()
    samples = exposed(cluster_families(state))
    assert value(samples["ollm_worker_up"], worker="w1") == 1
    assert value(samples["ollm_worker_running_sequences"], worker="w1") == 1
    assert value(samples["ollm_worker_batch_size"], worker="w1") == 1
    assert value(samples["ollm_worker_in_flight_requests"], worker="w1") == 1
    assert value(samples["ollm_worker_max_batch_size"], worker="w1") == 4
    assert value(samples["ollm_worker_memory_budget_bytes"], worker="w1") == 1 << 30
    assert value(samples["ollm_worker_model_in_flight_requests"], worker="w1", model="echo") == 1
    assert value(samples["ollm_worker_model_memory_bytes"], worker="w1", model="echo", pinned="true") == 0
    assert value(samples["ollm_queue_depth"], model="echo") == 2
    assert value(samples["ollm_batch_queue_depth"], model="echo") == 3


def test_an_old_workers_record_still_parses() -> None:
    """A worker from before the metrics fields: its hash has no running / batch_size."""
    server = fakeredis.FakeServer()
    sync = fakeredis.FakeRedis(server=server)
    Heartbeat(sync, KEYS, "old", ["echo"], 2, interval=1.0, in_flight=lambda: 0).beat()
    state = asyncio.run(read_cluster(fakeredis.FakeAsyncRedis(server=server), KEYS, lost_after=5.0))
    [worker] = state.workers
    assert worker.up and worker.info.running is None and worker.info.batch_size is None


def observed(registry: CollectorRegistry, name: str, **labels: str) -> float:
    found = registry.get_sample_value(name, labels)
    return 0.0 if found is None else found


def test_the_observer_times_tokens_and_counts_usage() -> None:
    metrics = Metrics()
    r = metrics.registry
    observer = metrics.stream("smol", "generate", started=100.0)
    observer.enqueued = 100.1
    observer.message({"type": "token", "text": "a"}, now=100.6)
    observer.message({"type": "token", "text": "b"}, now=100.8)
    observer.message({"type": "token", "text": "c"}, now=101.1)
    final = {
        "type": "final", "finish_reason": "length", "text": "abc",
        "usage": {"prompt_tokens": 7, "completion_tokens": 3},
        "timings": {"prompt_eval_ms": 300.0},
    }  # fmt: skip
    observer.message(final, now=101.2)
    observer.closed()  # after its final event: not abandoned
    assert observed(r, "ollm_time_to_first_token_seconds_sum", model="smol") == pytest.approx(0.6)
    assert observed(r, "ollm_inter_token_latency_seconds_count", model="smol") == 2
    assert observed(r, "ollm_inter_token_latency_seconds_sum", model="smol") == pytest.approx(0.5)
    # Enqueued at 100.1, first event at 100.6 of which 0.3 s was the prompt's prefill.
    assert observed(r, "ollm_queue_wait_seconds_sum", model="smol") == pytest.approx(0.2)
    assert observed(r, "ollm_prompt_tokens_total", model="smol") == 7
    assert observed(r, "ollm_generation_tokens_total", model="smol") == 3
    assert observed(r, "ollm_model_requests_total", model="smol", kind="generate", outcome="length") == 1
    assert observed(r, "ollm_model_request_duration_seconds_sum", model="smol", kind="generate") == pytest.approx(1.2)
    assert observed(r, "ollm_model_requests_total", model="smol", kind="generate", outcome="abandoned") == 0


def test_errors_embeddings_and_abandoned_streams_are_counted_by_outcome() -> None:
    metrics = Metrics()
    r = metrics.registry
    metrics.stream("echo", "generate", 0.0).message({"type": "error", "message": "x", "status": 503}, now=1.0)
    metrics.stream("mini", "embed", 0.0).message({"type": "embedding", "prompt_tokens": 5}, now=1.0)
    gone = metrics.stream("echo", "generate", 0.0)
    gone.message({"type": "token", "text": "a"}, now=0.5)
    gone.closed()
    gone.message({"type": "final", "finish_reason": "cancelled", "usage": {}}, now=2.0)  # nobody listens any more
    assert observed(r, "ollm_model_requests_total", model="echo", kind="generate", outcome="error") == 1
    assert observed(r, "ollm_model_requests_total", model="echo", kind="generate", outcome="abandoned") == 1
    assert observed(r, "ollm_model_requests_total", model="echo", kind="generate", outcome="cancelled") == 0
    assert observed(r, "ollm_model_requests_total", model="mini", kind="embed", outcome="ok") == 1
    assert observed(r, "ollm_prompt_tokens_total", model="mini") == 5
    assert observed(r, "ollm_time_to_first_token_seconds_count", model="echo") == 1
    # A malformed event is the stream reader's to refuse; the observer only skips it.
    metrics.stream("echo", "generate", 0.0).message({"type": "final", "usage": {"prompt_tokens": "many"}})


def scrape(client: TestClient, **headers: str) -> dict[str, list[Sample]]:
    answer = client.get("/metrics", headers=headers)
    assert answer.status_code == 200, answer.text
    assert answer.headers["content-type"].startswith("text/plain")
    return {family.name: family.samples for family in text_string_to_metric_families(answer.text)}


def requests_seen(samples: dict[str, list[Sample]], route: str, status: str, method: str = "GET") -> float:
    matching = [
        s.value for s in samples["ollm_http_requests"]
        if s.labels == {"method": method, "route": route, "status": status}
    ]  # fmt: skip
    return matching[0] if matching else 0.0


def test_requests_are_counted_by_route_template_and_status(clean_settings_env: Path) -> None:
    settings = Settings(redis={"url": "redis://fake", "namespace": "unit"}, server={"api_key": "sesame"})
    key = {"Authorization": "Bearer sesame"}
    with TestClient(create_app(settings, services_for(settings))) as client:
        before = scrape(client, **key)
        assert value(before["ollm_redis_up"]) == 1
        for session in ("a", "b", "c"):
            assert client.get(f"/v1/sessions/{session}", headers=key).status_code == 404
        assert client.get("/no/such/path", headers=key).status_code == 404
        assert client.get("/v1/sessions/d").status_code == 401  # refused before routing: still its template
        assert client.get("/metrics").status_code == 401  # as guarded as every other route
        assert client.get("/v1/health").status_code == 200
        # What Prometheus asks for by default; the text format otherwise.
        openmetrics = client.get("/metrics", headers={**key, "accept": "application/openmetrics-text; version=1.0.0"})
        assert openmetrics.headers["content-type"].startswith("application/openmetrics-text")
        assert openmetrics.text.endswith("# EOF\n") and "ollm_http_requests_total{" in openmetrics.text
        after = scrape(client, **key)
    template = "/v1/sessions/{session_id}"
    assert requests_seen(after, template, "404") - requests_seen(before, template, "404") == 3
    assert requests_seen(after, template, "401") == 1
    assert requests_seen(after, "unmatched", "404") == 1
    assert requests_seen(after, "/metrics", "401") == 1
    assert requests_seen(after, "/metrics", "200") == 2  # the scrapes before; this one is counted after it
    assert requests_seen(after, "/v1/health", "200") == 1
    assert not any("/v1/sessions/a" in s.labels.get("route", "") for s in after["ollm_http_requests"])
    durations = [s for s in after["ollm_http_request_duration_seconds"] if s.name.endswith("_count")]
    assert value(durations, route=template) == 4


def test_the_metrics_answer_without_redis(clean_settings_env: Path) -> None:
    settings = Settings(redis={"url": "redis://fake", "namespace": "unit"})
    services = services_for(settings)
    with TestClient(create_app(settings, services)) as client:
        services.sync.connection_pool.connection_kwargs["server"].connected = False  # Redis is down
        samples = scrape(client)
    assert value(samples["ollm_redis_up"]) == 0
    assert "ollm_worker_up" not in samples
