"""A Redis reached over TLS (``rediss://``), as across hosts: the server and the workers verify its
certificate against the CA named in the URL, and a certificate they cannot trust is a clear error."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import redis
import trustme

from tests.integration.conftest import ServerFactory, WorkerFactory
from tests.integration.harness import json_events, new_namespace
from tests.integration.tls import TlsTerminator
from workers.redis_server import RedisServer

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def tls_redis(redis_server: RedisServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[TlsTerminator]:
    terminator = TlsTerminator(redis_server.port, tmp_path_factory.mktemp("tls")).start()
    yield terminator
    terminator.stop()


@pytest.fixture
def untrusted_ca(tmp_path: Path) -> Path:
    """A CA that did not sign the Redis server's certificate."""
    path = tmp_path / "other-ca.pem"
    trustme.CA().cert_pem.write_to_path(str(path))
    return path


def test_server_and_worker_generate_through_a_tls_redis(
    tls_redis: TlsTerminator, start_worker: WorkerFactory, start_server: ServerFactory
) -> None:
    url = tls_redis.url()
    ns = new_namespace()
    handshakes = tls_redis.handshakes
    # The echo model: what crosses Redis (the job, its events, its result) is the same for every
    # model, and the real one's load cost this test most of its time.
    start_worker("echo", redis_url=url, ns=ns)
    server = start_server(redis_url=url, ns=ns)
    client = server.openai_client()

    # A generation whose every event crossed TLS (queue, pub/sub, result).
    answer = client.chat.completions.create(model="echo", messages=[{"role": "user", "content": "Say hello."}])
    assert answer.usage is not None and answer.usage.completion_tokens == 2
    assert answer.choices[0].message.content == "Say hello."
    # A stream, relayed from the worker's events as they come.
    body = {"model": "echo", "stream": True, "messages": [{"role": "user", "content": "over tls"}]}
    pieces = []
    with httpx.stream("POST", f"{server.url}/v1/chat/completions", json=body, timeout=60) as response:
        assert response.status_code == 200
        for _, event in json_events(response.iter_lines()):
            if event != "[DONE]" and event["choices"]:
                pieces.append(event["choices"][0]["delta"].get("content") or "")
    assert "".join(pieces) == "over tls"
    # The server's own store goes through the same URL.
    stored = client.responses.create(model="echo", input="kept", store=True)
    assert client.responses.retrieve(stored.id).output_text == "kept"

    health = httpx.get(f"{server.url}/v1/health", timeout=30).json()
    assert health["redis"]["status"] == "ok" and health["models"]["echo"]["workers"] == 1
    assert tls_redis.handshakes > handshakes
    # Nothing reached this Redis in the clear: its port speaks TLS only.
    with pytest.raises(redis.ConnectionError):
        redis.Redis(host="127.0.0.1", port=tls_redis.port, socket_timeout=5).ping()


def test_a_certificate_the_server_cannot_trust_is_a_503_that_says_what_to_set(
    tls_redis: TlsTerminator, start_server: ServerFactory, untrusted_ca: Path
) -> None:
    server = start_server(redis_url=tls_redis.url(untrusted_ca), ns=new_namespace())
    health = httpx.get(f"{server.url}/v1/health", timeout=30)
    assert health.status_code == 503
    error = health.json()["redis"]["error"]
    assert "CERTIFICATE_VERIFY_FAILED" in error and "ssl_ca_certs" in error
    body = {"model": "echo", "messages": [{"role": "user", "content": "refused"}]}
    answer = httpx.post(f"{server.url}/v1/chat/completions", json=body, timeout=30)
    assert answer.status_code == 503, answer.text
    message = answer.json()["error"]["message"]
    assert "not trusted" in message and "ssl_ca_certs" in message


def test_a_worker_that_cannot_trust_the_certificate_exits_saying_so(
    tls_redis: TlsTerminator, start_worker: WorkerFactory, untrusted_ca: Path
) -> None:
    worker = start_worker("echo", redis_url=tls_redis.url(untrusted_ca), ns=new_namespace(), wait=False)
    # At once, rather than after retrying for a minute as for a Redis that is still starting.
    assert worker.popen.wait(timeout=50) == 1
    output = worker.output()
    assert "CERTIFICATE_VERIFY_FAILED" in output and "ssl_ca_certs" in output
    assert "Traceback" not in output
