"""The /api routes in-process, for what needs no Redis: Ollama's error shape and status codes
come from the routes themselves, and /v1 keeps OpenAI's."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable, Iterator

import pytest
from fastapi.responses import StreamingResponse
from fastapi.testclient import TestClient

from ollm.errors import PullError
from ollm.settings import Settings
from server.app import create_app
from server.ollama.api_router import progress_response
from server.ollama.protocol import ProgressResponse


@pytest.fixture(scope="module")
def client() -> Iterator[TestClient]:
    # Nothing listens on port 1: a route that reached Redis would answer 503.
    app = create_app(Settings.model_validate({"redis": {"url": "redis://127.0.0.1:1/0"}}))
    with TestClient(app) as test_client:
        yield test_client


def test_liveness_and_version(client: TestClient) -> None:
    assert client.get("/").text == "Ollama is running"
    assert client.head("/").status_code == 200
    assert client.get("/api/version").json() == {"version": "0.12.0"}


def test_bad_input_is_400_in_ollamas_shape(client: TestClient) -> None:
    not_json = client.post("/api/generate", content=b"{oops", headers={"content-type": "text/plain"})
    assert not_json.status_code == 400 and set(not_json.json()) == {"error"}
    assert client.post("/api/chat", json={"messages": []}).json() == {"error": "model is required"}
    wrong_type = client.post("/api/chat", json={"model": "m", "messages": "hi"})
    assert wrong_type.status_code == 400 and wrong_type.json()["error"].startswith("messages")


def test_unknown_routes_and_methods_are_ollamas_404(client: TestClient) -> None:
    assert client.get("/api/nope").json() == {"error": "404 page not found: GET /api/nope"}
    assert client.post("/api/tags").status_code == 404
    assert isinstance(client.get("/v1/nope").json()["error"], dict)


def test_push_is_refused_clearly(client: TestClient) -> None:
    response = client.post("/api/push", json={"model": "m"})
    assert response.status_code == 501 and "no model registry" in response.json()["error"]


def test_redis_down_is_503(client: TestClient) -> None:
    response = client.get("/api/ps")
    assert response.status_code == 503 and "Redis is unavailable" in response.json()["error"]


async def _body(response: StreamingResponse) -> list[dict[str, object]]:
    chunks = [chunk async for chunk in response.body_iterator]
    text = "".join(c if isinstance(c, str) else bytes(c).decode() for c in chunks)
    assert text.endswith("\n")
    return [json.loads(line) for line in text.splitlines()]


def test_pull_progress_streams_as_ndjson_and_failures_end_the_stream() -> None:
    def downloads(report: Callable[[ProgressResponse], None]) -> None:
        report(ProgressResponse(status="pulling x", total=10, completed=4))
        report(ProgressResponse(status="pulling x", total=10, completed=10))
        report(ProgressResponse(status="success"))

    def fails(report: Callable[[ProgressResponse], None]) -> None:
        report(ProgressResponse(status="pulling x", total=10, completed=1))
        raise PullError("could not download x: network down")

    async def run() -> None:
        first = ProgressResponse(status="pulling manifest")
        streamed = await progress_response(downloads, True, first)
        assert isinstance(streamed, StreamingResponse) and streamed.media_type == "application/x-ndjson"
        assert await _body(streamed) == [
            {"status": "pulling manifest"},
            {"status": "pulling x", "total": 10, "completed": 4},
            {"status": "pulling x", "total": 10, "completed": 10},
            {"status": "success"},
        ]
        whole = await progress_response(downloads, False, first)
        assert json.loads(bytes(whole.body)) == {"status": "success"}
        failed = await progress_response(fails, True, first)
        assert isinstance(failed, StreamingResponse)
        assert (await _body(failed))[-1] == {"error": "could not download x: network down"}
        with pytest.raises(PullError):
            await progress_response(fails, False, first)

    asyncio.run(run())
