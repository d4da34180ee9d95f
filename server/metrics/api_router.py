"""``GET /metrics``: the Prometheus exposition (text format, or OpenMetrics when asked for)."""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import redis
from fastapi import APIRouter, Depends, Request, Response
from prometheus_client import CollectorRegistry
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.exposition import choose_encoder

from server.metrics.cluster import cluster_families, read_cluster
from server.routing import ClientInputRoute
from server.services import Services, services

# Not in /openapi.json: it is no API of the families' and answers no JSON.
router = APIRouter(route_class=ClientInputRoute, include_in_schema=False)


class Scrape:
    """What one scrape exposes: the app's own instruments and the cluster read just now."""

    def __init__(self, registry: CollectorRegistry, cluster: list[Metric]) -> None:
        self.registry = registry
        self.cluster = cluster

    def collect(self) -> Iterator[Metric]:
        yield from self.registry.collect()
        yield from self.cluster


@router.get("/metrics")
async def metrics(request: Request, svc: Services = Depends(services)) -> Response:
    redis_up = GaugeMetricFamily("ollm_redis_up", "1 when this scrape could read the workers and queues from Redis.")
    cluster: Iterable[Metric]
    try:
        state = await read_cluster(svc.connection, svc.keys, svc.settings.server.worker_lost_seconds)
    except (redis.RedisError, OSError):
        # The server's own figures still count, above all while Redis is away.
        redis_up.add_metric([], 0.0)
        cluster = []
    else:
        redis_up.add_metric([], 1.0)
        cluster = cluster_families(state)
    encode, content_type = choose_encoder(request.headers.get("accept", ""))
    body = encode(Scrape(svc.dispatcher.metrics.registry, [redis_up, *cluster]))
    return Response(body, media_type=None, headers={"content-type": content_type})
