"""`python -m bench.metrics`: what the Prometheus metrics cost.

* per job, in the server: the observer's work for each token event and for the final event
  (``server.metrics.instruments``), in microseconds;
* per HTTP request: the request-counting middleware around an app that answers at once;
* per scrape: reading the workers and queues from a real Redis (loopback) and encoding the
  exposition, with 1, 16 and 64 registered workers each holding two models, and the body size.

    python -m bench.metrics
    python -m bench.metrics --workers 1,64,256 --scrapes 50
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import statistics
import time

import redis
import redis.asyncio
from prometheus_client.exposition import generate_latest

from ollm.contract import Keys, LoadedModel
from server.metrics.api_router import Scrape
from server.metrics.cluster import cluster_families, read_cluster
from server.metrics.instruments import Metrics
from server.metrics.requests import RequestMetrics
from workers.heartbeat import Heartbeat
from workers.redis_server import RedisServer


def observer_costs(tokens: int = 200, jobs: int = 2000) -> tuple[float, float]:
    """Microseconds per token event and per final event."""
    metrics = Metrics()
    token = {"type": "token", "text": " word"}
    usage = {"prompt_tokens": 12, "completion_tokens": tokens}
    final = {"type": "final", "finish_reason": "stop", "text": "", "usage": usage, "timings": {"prompt_eval_ms": 3.0}}
    observers = [metrics.stream(f"model-{i % 4}", "generate", time.monotonic()) for i in range(jobs)]
    started = time.perf_counter()
    for observer in observers:
        for _ in range(tokens):
            observer.message(token)
    per_token = (time.perf_counter() - started) / (jobs * tokens)
    started = time.perf_counter()
    for observer in observers:
        observer.message(final)
    per_final = (time.perf_counter() - started) / jobs
    return per_token * 1e6, per_final * 1e6


def middleware_cost(requests: int = 20_000) -> float:
    """Microseconds the request-counting middleware adds to one request (template already matched)."""
    from starlette.routing import Route
    from starlette.types import Receive, Scope, Send

    route = Route("/v1/sessions/{session_id}", lambda request: None)

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        scope["route"] = route
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    async def receive() -> dict[str, object]:
        return {"type": "http.request", "body": b""}

    async def send(message: object) -> None:
        return None

    async def run(target: object) -> float:
        started = time.perf_counter()
        for _ in range(requests):
            scope = {"type": "http", "method": "GET", "path": "/v1/sessions/x", "headers": []}
            await target(scope, receive, send)  # type: ignore[operator]
        return time.perf_counter() - started

    bare = asyncio.run(run(app))
    counted = asyncio.run(run(RequestMetrics(app, Metrics(), [route])))
    return (counted - bare) / requests * 1e6


def register(connection: redis.Redis, keys: Keys, count: int) -> None:
    status: dict[str, str | int] = {
        "running": 3, "batch_size": 2, "memory_budget": 8 << 30, "memory_used": 1 << 30, "loads": 2
    }  # fmt: skip
    for i in range(count):
        Heartbeat(connection, keys, f"w{i}", ["echo", "smol"], 16, 1.0, lambda: 3, lambda: status).beat()
    # All of them in this process: they share one loaded-models hash, read once per worker all the same.
    loaded = {m: LoadedModel(names=[m], size=270 << 20, in_flight=1).model_dump_json() for m in ("echo", "smol")}
    connection.hset(keys.loaded(socket.gethostname(), os.getpid()), mapping=loaded)  # type: ignore[arg-type]
    connection.rpush(keys.rq_queue_key("smol"), *[f"job{i}" for i in range(5)])
    connection.sadd("rq:queues", keys.rq_queue_key("smol"), keys.rq_queue_key("echo"))


async def scrape_costs(url: str, keys: Keys, scrapes: int) -> tuple[float, float, int]:
    """Median milliseconds to read Redis and to encode, and the body's size."""
    connection = redis.asyncio.Redis.from_url(url)
    metrics = Metrics()
    reads, encodes, size = [], [], 0
    try:
        for _ in range(scrapes):
            started = time.perf_counter()
            state = await read_cluster(connection, keys, lost_after=5.0)
            read = time.perf_counter()
            body = generate_latest(Scrape(metrics.registry, cluster_families(state)))
            reads.append(read - started)
            encodes.append(time.perf_counter() - read)
            size = len(body)
    finally:
        await connection.aclose()
    return statistics.median(reads) * 1000, statistics.median(encodes) * 1000, size


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workers", default="1,16,64", help="Registered workers per scrape measurement.")
    parser.add_argument("--scrapes", type=int, default=30)
    args = parser.parse_args()

    per_token, per_final = observer_costs()
    print(f"observer: {per_token:.2f} us per token event, {per_final:.2f} us per final event")
    print(f"request middleware: {middleware_cost():.2f} us per request")
    from bench.stack import free_port

    server = RedisServer(port=free_port()).start()
    try:
        connection = redis.Redis.from_url(server.url)
        print(f"{'workers':>8} {'read Redis ms':>14} {'encode ms':>10} {'body KiB':>9}")
        for count in [int(n) for n in args.workers.split(",")]:
            keys = Keys(f"bench{count}")
            register(connection, keys, count)
            read, encode, size = asyncio.run(scrape_costs(server.url, keys, args.scrapes))
            print(f"{count:>8} {read:>14.2f} {encode:>10.2f} {size / 1024:>9.1f}")
        connection.close()
    finally:
        server.stop()


if __name__ == "__main__":
    main()
