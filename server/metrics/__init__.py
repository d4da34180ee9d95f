"""Prometheus metrics (``GET /metrics``), documented in docs/metrics.md.

* ``instruments.py``: the server's own counters and histograms (one registry per app) and the
  ``StreamObserver`` that times each job's events in the shared dispatch layer, so every API
  family is measured once, the same way;
* ``requests.py``: the ASGI middleware counting HTTP requests by route template and status;
* ``cluster.py``: what the workers and queues look like, read from Redis at scrape time and
  turned into gauges (no worker host is scraped);
* ``api_router.py``: the route.
"""
