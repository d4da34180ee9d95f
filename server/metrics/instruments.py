"""The server's own metrics: HTTP requests, and per model the jobs, their tokens and latencies.

Every job of every API family is enqueued by ``server.dispatch`` and its events come back through
one ``JobStream``; that stream hands each message to a ``StreamObserver``, so time to first
token, inter-token latency, queue wait and token counts are measured in one place, whichever
family (OpenAI, Ollama, Anthropic, native) asked.
"""

from __future__ import annotations

import logging
import time
from typing import Any, Literal

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.metrics import disable_created_metrics
from prometheus_client.process_collector import ProcessCollector

log = logging.getLogger(__name__)

# The `_created` series double the series of every counter and histogram and no query of ours
# reads them. (A process-wide switch; the server is their only user in its process.)
disable_created_metrics()

JobKind = Literal["generate", "embed"]

# Seconds. From a millisecond echo token to minutes-long generations of a large model on a CPU.
_LATENCY_BUCKETS = (
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75,
    1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0,
)  # fmt: skip
_DURATION_BUCKETS = (
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 60.0,
    120.0, 240.0, 480.0, 960.0, 1920.0,
)  # fmt: skip
_LAST = ("final", "error", "embedding")


class Metrics:
    """The instruments of one app, in their own registry (tests run several apps in a process)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        ProcessCollector(registry=self.registry)
        registry = self.registry
        self.http_requests = Counter(
            "ollm_http_requests", "HTTP requests answered, by route template and status code.",
            ["method", "route", "status"], registry=registry,
        )  # fmt: skip
        self.http_duration = Histogram(
            "ollm_http_request_duration_seconds",
            "From the request's arrival until the last byte of its response (a whole stream).",
            ["method", "route"], buckets=_DURATION_BUCKETS, registry=registry,
        )  # fmt: skip
        self.model_requests = Counter(
            "ollm_model_requests", "Jobs run for a model, by kind and outcome (finish reason, error or abandoned).",
            ["model", "kind", "outcome"], registry=registry,
        )  # fmt: skip
        self.model_duration = Histogram(
            "ollm_model_request_duration_seconds",
            "From dispatch (before a load the model may need) until the job's last event.",
            ["model", "kind"], buckets=_DURATION_BUCKETS, registry=registry,
        )  # fmt: skip
        self.prompt_tokens = Counter(
            "ollm_prompt_tokens", "Prompt tokens processed, from the usage of finished jobs.", ["model"],
            registry=registry,
        )  # fmt: skip
        self.generation_tokens = Counter(
            "ollm_generation_tokens", "Tokens generated, from the usage of finished jobs.", ["model"],
            registry=registry,
        )  # fmt: skip
        self.time_to_first_token = Histogram(
            "ollm_time_to_first_token_seconds", "From dispatch until the first token reaches the server.",
            ["model"], buckets=_LATENCY_BUCKETS, registry=registry,
        )  # fmt: skip
        self.inter_token_latency = Histogram(
            "ollm_inter_token_latency_seconds", "Between consecutive token events of a job, as they reach the server.",
            ["model"], buckets=_LATENCY_BUCKETS, registry=registry,
        )  # fmt: skip
        self.queue_wait = Histogram(
            "ollm_queue_wait_seconds",
            "From enqueue until the engine began the prompt: queued, loading, dequeued, waiting for a batch slot.",
            ["model"], buckets=_DURATION_BUCKETS, registry=registry,
        )  # fmt: skip

    def stream(self, model: str, kind: JobKind, started: float) -> StreamObserver:
        """An observer for a job just enqueued; ``started`` is when its dispatch began (monotonic)."""
        return StreamObserver(self, model, kind, started)


class StreamObserver:
    """Times one job's events as the server receives them, and counts its usage at the end."""

    def __init__(self, metrics: Metrics, model: str, kind: JobKind, started: float) -> None:
        self.metrics = metrics
        self.model = model
        self.kind = kind
        self.started = started
        self.enqueued = time.monotonic()
        self.first_message: float | None = None
        self.last_token: float | None = None
        self.ended = False
        # Looked up once per job, not per token: the label lookup costs more than the observation.
        self._inter_token = metrics.inter_token_latency.labels(model)

    def message(self, data: dict[str, Any], now: float | None = None) -> None:
        """One message of the job's stream (a token, final, error or embedding event as JSON)."""
        if self.ended:
            return
        now = time.monotonic() if now is None else now
        try:
            self._message(data, now)
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            # The event itself is validated (and refused) by the stream's reader; a metric is never
            # worth failing a request for.
            log.debug("not measured: %s (%r)", exc, data)

    def closed(self) -> None:
        """The stream ends: if it never saw its last event (client gone, timeout), it was abandoned."""
        if not self.ended:
            self.ended = True
            self.metrics.model_requests.labels(self.model, self.kind, "abandoned").inc()

    def _message(self, data: dict[str, Any], now: float) -> None:
        metrics, model = self.metrics, self.model
        kind = data.get("type")
        if self.first_message is None:
            self.first_message = now
        if kind == "token":
            if self.last_token is None:
                metrics.time_to_first_token.labels(model).observe(now - self.started)
            else:
                self._inter_token.observe(now - self.last_token)
            self.last_token = now
            return
        if kind not in _LAST:
            return
        self.ended = True
        outcome = "error"
        if kind == "final":
            outcome = str(data["finish_reason"])
            usage = data.get("usage") or {}
            metrics.prompt_tokens.labels(model).inc(int(usage.get("prompt_tokens", 0)))
            metrics.generation_tokens.labels(model).inc(int(usage.get("completion_tokens", 0)))
            # The first event leaves the worker once the prompt is prefilled: that time is the
            # engine's, not the queue's.
            prefill = float((data.get("timings") or {}).get("prompt_eval_ms", 0.0)) / 1000
            metrics.queue_wait.labels(model).observe(max(0.0, self.first_message - self.enqueued - prefill))
        elif kind == "embedding":
            outcome = "ok"
            metrics.prompt_tokens.labels(model).inc(int(data.get("prompt_tokens", 0)))
        metrics.model_requests.labels(model, self.kind, outcome).inc()
        metrics.model_duration.labels(model, self.kind).observe(now - self.started)
