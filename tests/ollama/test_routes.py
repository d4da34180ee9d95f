"""The /api routes in-process, for what needs no Redis: Ollama's error shape and status codes
come from the routes themselves, and /v1 keeps OpenAI's."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from fastapi.testclient import TestClient

from ollm.settings import Settings
from server.app import create_app


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
