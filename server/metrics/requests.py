"""ASGI middleware counting HTTP requests by route template and status, and timing them.

The label is the route's template (``/v1/responses/{response_id}``), never the raw path, so the
number of series stays bounded whatever clients send. The middleware is the outermost one, so
requests refused before routing (401 without the API key, 413 too large) count too: their
template is found by matching the app's routes, and a path no route matches is ``unmatched``.
"""

from __future__ import annotations

import time

from fastapi import APIRouter, FastAPI
from starlette.routing import BaseRoute, Match, Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from server.metrics.instruments import Metrics

UNMATCHED = "unmatched"
# A client may send any token as its method; only these become label values.
_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})


def endpoints(app: FastAPI, routers: list[APIRouter]) -> list[BaseRoute]:
    """Every route with a path template: the app's own (docs) and its routers'. (The app's route
    list holds an included router as one entry, with no template of its own.)"""
    return [r for r in app.router.routes if isinstance(r, Route)] + [r for router in routers for r in router.routes]


class RequestMetrics:
    def __init__(self, app: ASGIApp, metrics: Metrics, routes: list[BaseRoute]) -> None:
        self.app = app
        self.metrics = metrics
        self.routes = routes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.monotonic()
        status = 500  # what Starlette answers for an exception that escapes the app
        counted = False

        def count() -> None:
            nonlocal counted
            counted = True
            method = scope["method"] if scope["method"] in _METHODS else "other"
            route = self.template(scope)
            self.metrics.http_requests.labels(method, route, str(status)).inc()
            self.metrics.http_duration.labels(method, route).observe(time.monotonic() - started)

        async def observed_send(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            elif message["type"] == "http.response.body" and not message.get("more_body", False):
                # Before the last byte leaves: a client that has its whole answer and scrapes at
                # once finds its request counted.
                count()
            await send(message)

        try:
            await self.app(scope, receive, observed_send)
        finally:
            if not counted:  # no complete response: an exception, or the client left mid-stream
                count()

    def template(self, scope: Scope) -> str:
        # The router records the route it matched in the scope it shares with us.
        route = scope.get("route")
        path = getattr(route, "path", None)
        if isinstance(path, str):
            return path
        # Refused before routing: match as the router would (a full match, else a partial one,
        # which the router answers with 405).
        partial: BaseRoute | None = None
        for candidate in self.routes:
            match, _ = candidate.matches(scope)
            if match == Match.FULL:
                return str(getattr(candidate, "path", UNMATCHED))
            if match == Match.PARTIAL and partial is None:
                partial = candidate
        return str(getattr(partial, "path", UNMATCHED))
